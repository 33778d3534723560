"""Cubic materials for LACBED data: common cubic structure types with element substitutions, closer to
the population of the ICSD's cubic entries than random crystals of the 36 cubic space groups.

    material = random_material(np.random.default_rng(0))         # Material: type, elements, structure
    material.name, material.structure                           # "rock salt KBr a=6.400", a pymatgen Structure
    build("perovskite", {"A": "Ba", "B": "Ti", "X": "O"})        # one given substitution

A structure type is a space group, Wyckoff sites (one element each, by role) and a pool of elements per
role (`TYPES`). Lattice constants follow one stated rule: the type's nearest-neighbour bond (`bond`, two
roles) scales with the sum of the two elements' atomic radii (J. C. Slater, J. Chem. Phys. 41, 3199
(1964), as `pymatgen.core.Element.atomic_radius` gives them), calibrated so that the prototype gets its
measured lattice constant (a plausible spread of cells, not a prediction of each):

    a = a_prototype · (r_1 + r_2) / (r_1,prototype + r_2,prototype)

The prototypes' lattice constants are room-temperature handbook values (R. W. G. Wyckoff, "Crystal
Structures", 2nd ed., Wiley 1963-71); the rule puts MgO, KCl, GaAs and BaTiO3 within 1-4 % of their
measured constants, while metals fare worse (fcc Al: 3.35 Å against 4.05, Slater's radii being ionic-
leaning). The LACBED tilt range scales with 1/a, so a wrong a shifts no feature in the pattern. Fd-3m
sites are in origin choice 1 (pymatgen's setting). Every built structure is checked with spglib to have
its type's space group (`build` raises otherwise): substitutions never add symmetry, because the pools of
a type's roles are disjoint.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np

SYMPREC = 1e-3


@dataclass(frozen=True)
class StructureType:
    name: str
    space_group: str  # Hermann–Mauguin symbol, as pymatgen's Structure.from_spacegroup reads it
    number: int  # its International Tables number (checked with spglib)
    sites: tuple[tuple[str, tuple[float, float, float]], ...]  # (role, a representative Wyckoff position)
    prototype: dict  # role -> element of the prototype compound
    a_prototype: float  # Å, measured
    bond: tuple[str, str]  # the two roles of the nearest-neighbour bond the rule scales
    pools: dict  # role -> elements it may take

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(role for role, _ in self.sites))


TYPES: dict[str, StructureType] = {t.name: t for t in (
    StructureType("rock salt", "Fm-3m", 225, (("A", (0, 0, 0)), ("B", (0.5, 0.5, 0.5))),
                  {"A": "Na", "B": "Cl"}, 5.640, ("A", "B"),
                  {"A": ("Li", "Na", "K", "Rb", "Mg", "Ca", "Sr", "Ba", "Mn", "Fe", "Co", "Ni", "Cd", "Pb"),
                   "B": ("F", "Cl", "Br", "I", "O", "S", "Se", "Te")}),
    StructureType("caesium chloride", "Pm-3m", 221, (("A", (0, 0, 0)), ("B", (0.5, 0.5, 0.5))),
                  {"A": "Cs", "B": "Cl"}, 4.123, ("A", "B"),
                  {"A": ("Cs", "Tl", "Fe", "Co", "Ni", "Cu", "Ag", "Au", "Be"),
                   "B": ("Cl", "Br", "I", "Al", "Zn", "Ga", "Mg")}),
    StructureType("zinc blende", "F-43m", 216, (("A", (0, 0, 0)), ("B", (0.25, 0.25, 0.25))),
                  {"A": "Zn", "B": "S"}, 5.409, ("A", "B"),
                  {"A": ("Zn", "Cd", "Hg", "Ga", "In", "Al", "B", "Cu", "Be"),
                   "B": ("S", "Se", "Te", "P", "As", "Sb", "N", "Cl")}),
    StructureType("fluorite", "Fm-3m", 225, (("A", (0, 0, 0)), ("X", (0.25, 0.25, 0.25))),
                  {"A": "Ca", "X": "F"}, 5.463, ("A", "X"),
                  {"A": ("Ca", "Sr", "Ba", "Cd", "Pb", "Ce", "Th", "U", "Zr", "Hf"), "X": ("F", "Cl", "O")}),
    StructureType("antifluorite", "Fm-3m", 225, (("X", (0, 0, 0)), ("A", (0.25, 0.25, 0.25))),
                  {"A": "Li", "X": "O"}, 4.619, ("A", "X"),
                  {"A": ("Li", "Na", "K", "Rb"), "X": ("O", "S", "Se", "Te")}),
    StructureType("perovskite", "Pm-3m", 221, (("A", (0.5, 0.5, 0.5)), ("B", (0, 0, 0)), ("X", (0.5, 0, 0))),
                  {"A": "Sr", "B": "Ti", "X": "O"}, 3.905, ("B", "X"),
                  {"A": ("Ca", "Sr", "Ba", "Pb", "La", "K", "Na"),
                   "B": ("Ti", "Zr", "Nb", "Ta", "Mn", "Fe", "Co", "Ni", "Al", "Sn"), "X": ("O", "F")}),
    StructureType("spinel", "Fd-3m", 227, (("A", (0, 0, 0)), ("B", (0.625, 0.625, 0.625)),
                                           ("X", (0.3874, 0.3874, 0.3874))),
                  {"A": "Mg", "B": "Al", "X": "O"}, 8.083, ("B", "X"),
                  {"A": ("Mg", "Zn", "Fe", "Co", "Ni", "Mn", "Cd"), "B": ("Al", "Cr", "Ga", "V", "Ti", "Rh"),
                   "X": ("O", "S")}),
    StructureType("Heusler", "Fm-3m", 225, (("X", (0.25, 0.25, 0.25)), ("Y", (0, 0, 0)), ("Z", (0.5, 0.5, 0.5))),
                  {"X": "Cu", "Y": "Mn", "Z": "Al"}, 5.949, ("X", "Y"),
                  {"X": ("Cu", "Ni", "Co", "Fe", "Pd", "Rh"), "Y": ("Mn", "Ti", "V", "Cr", "Zr", "Hf"),
                   "Z": ("Al", "Ga", "In", "Si", "Ge", "Sn", "Sb")}),
    StructureType("A15", "Pm-3n", 223, (("A", (0.25, 0, 0.5)), ("B", (0, 0, 0))),
                  {"A": "Cr", "B": "Si"}, 4.556, ("A", "A"),
                  {"A": ("Nb", "V", "Cr", "Mo", "Ti", "Ta"), "B": ("Sn", "Ge", "Si", "Al", "Ga", "Ir", "Au", "Os")}),
    StructureType("L1_2", "Pm-3m", 221, (("A", (0.5, 0.5, 0)), ("B", (0, 0, 0))),
                  {"A": "Cu", "B": "Au"}, 3.749, ("A", "B"),
                  {"A": ("Cu", "Ni", "Pt", "Pd", "Co"), "B": ("Au", "Al", "Fe", "Mn", "Ti", "Ga", "Ge")}),
    StructureType("diamond", "Fd-3m", 227, (("A", (0, 0, 0)),), {"A": "Si"}, 5.431, ("A", "A"),
                  {"A": ("C", "Si", "Ge", "Sn")}),
    StructureType("fcc", "Fm-3m", 225, (("A", (0, 0, 0)),), {"A": "Cu"}, 3.615, ("A", "A"),
                  {"A": ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Pb", "Ir", "Rh", "Ca", "Sr")}),
    StructureType("bcc", "Im-3m", 229, (("A", (0, 0, 0)),), {"A": "Fe"}, 2.867, ("A", "A"),
                  {"A": ("Fe", "Cr", "Mo", "W", "V", "Nb", "Ta", "Li", "Na", "K", "Ba", "Eu")}),
)}


@dataclass(frozen=True)
class Material:
    type: str
    elements: dict  # role -> element
    a: float  # Å
    structure: object  # pymatgen Structure, the conventional cubic cell

    @property
    def formula(self) -> str:
        return self.structure.composition.reduced_formula

    @property
    def name(self) -> str:
        return f"{self.type} {self.formula} a={self.a:.3f}"

    @property
    def key(self) -> str:
        """The material's identity (type and elements), what a split by material keeps apart."""
        return f"{self.type}:" + ",".join(f"{role}={el}" for role, el in sorted(self.elements.items()))


def _radius(element: str) -> float:
    from pymatgen.core import Element

    r = Element(element).atomic_radius
    if r is None:
        raise ValueError(f"element {element}: no atomic radius to scale a lattice constant by")
    return float(r)


def lattice_constant(kind: StructureType, elements: dict) -> float:
    """The rule above: the prototype's a scaled by the bond's radius sum."""
    one, two = kind.bond
    ratio = (_radius(elements[one]) + _radius(elements[two])) / (_radius(kind.prototype[one]) + _radius(kind.prototype[two]))
    return kind.a_prototype * ratio


@functools.lru_cache(maxsize=None)
def _template(type_name: str) -> tuple[tuple[str, ...], np.ndarray]:
    """(role of each atom, fractional coordinates) of the type's conventional cell: the Wyckoff sites
    expanded by the space group once (pymatgen's SpaceGroup takes a second to build), then reused."""
    from pymatgen.core import Lattice, Structure

    kind = TYPES[type_name]
    placeholder = ("H", "He", "Li", "Be")  # one element a role, to tell the roles apart after expansion
    structure = Structure.from_spacegroup(kind.space_group, Lattice.cubic(kind.a_prototype),
                                          [placeholder[kind.roles.index(r)] for r, _ in kind.sites],
                                          [list(p) for _, p in kind.sites])
    roles = tuple(kind.roles[placeholder.index(site.specie.symbol)] for site in structure)
    return roles, structure.frac_coords.copy()


def build(type_name: str, elements: dict | None = None, a: float | None = None) -> Material:
    """The conventional cell of `type_name` with these elements (default: the prototype's) at lattice
    constant `a` (default: the rule's); its space group checked with spglib."""
    import spglib
    from pymatgen.core import Lattice, Structure

    if type_name not in TYPES:
        raise ValueError(f"unknown structure type {type_name!r}; choices: {', '.join(TYPES)}")
    kind = TYPES[type_name]
    elements = dict(kind.prototype if elements is None else elements)
    if set(elements) != set(kind.roles):
        raise ValueError(f"{type_name}: elements for roles {', '.join(kind.roles)}, got {', '.join(elements)}")
    a = lattice_constant(kind, elements) if a is None else float(a)
    roles, frac = _template(type_name)
    structure = Structure(Lattice.cubic(a), [elements[r] for r in roles], frac)
    cell = (structure.lattice.matrix, structure.frac_coords, structure.atomic_numbers)
    with warnings.catch_warnings():  # spglib 2.x's old error handling warns on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        dataset = spglib.get_symmetry_dataset(cell, symprec=SYMPREC)
    if dataset is None or dataset.number != kind.number:
        found = None if dataset is None else dataset.number
        raise ValueError(f"{type_name} {elements}: spglib finds space group {found}, not {kind.number}")
    return Material(type_name, elements, a, structure)


def random_material(rng: np.random.Generator, types=None) -> Material:
    """A structure type (uniform over `types`, default all) and an element for each role (uniform over its
    pool, different roles never the same element)."""
    name, elements = draw(rng, types)
    return build(name, elements)


def draw(rng: np.random.Generator, types=None) -> tuple[str, dict]:
    """(type, elements) of a random material, unbuilt: what `random_material` builds."""
    names = list(TYPES if types is None else types)
    kind = TYPES[names[int(rng.integers(len(names)))]]
    elements: dict = {}
    for role in kind.roles:
        pool = [el for el in kind.pools[role] if el not in elements.values()]
        elements[role] = pool[int(rng.integers(len(pool)))]
    return kind.name, elements


def material_count(types=None) -> int:
    """How many distinct materials (type, elements) the pools allow: what a split by material divides."""
    total = 0
    for name in (TYPES if types is None else types):
        kind = TYPES[name]
        n = 1
        for role in kind.roles:
            n *= len(kind.pools[role])
        total += n
    return total
