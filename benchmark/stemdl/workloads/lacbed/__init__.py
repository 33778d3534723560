"""The learned LACBED simulator (issue 16): Bloch-wave LACBED data of cubic materials (`synth`), and the
`stemdl lacbed` command (`commands`). The surrogate workload is to come."""
