"""Electron-scattering physics shared by the workloads: dynamical (multislice) simulation in torch.

Units throughout: lengths in Å, reciprocal lengths in 1/Å without a 2π, angles in mrad, energies in keV,
projected potentials in V·Å. Modules:

* `electrons`: relativistic wavelength and interaction parameter.
* `parameters`: the tabulated electron scattering factors (a published parameterization, cited there).
* `supercell`: an orthogonal supercell of a crystal for a zone axis, in the beam frame.
* `potential`: projected potentials of the slices of a supercell on a grid.
* `waves`: the simulation grid, probes, plane waves, propagators and the bandwidth limit.
* `multislice`: propagation through the slices, and the patterns made from the exit waves.
* `simulate`: the front door: plan a CBED/4D-STEM simulation of a crystal, run it, projected potentials.
* `bloch`: Bloch-wave LACBED (structure matrix per incident direction), and the same by multislice.
* `commands`: `stemdl simulate cbed|potential`; `figures`: the montage of docs/physics.md.
"""
