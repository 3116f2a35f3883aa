"""A model of heterogeneous client hardware: device profiles (`profiles`), the
time and memory a client's round costs on them (`cost`), which method and rank
each client can run (`planner`), and who is available, fails or straggles in a
round (`schedule`). docs/hardware.md explains the numbers and their sources."""
