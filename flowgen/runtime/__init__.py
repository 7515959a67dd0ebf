"""Stage 5: runtime — problems, eigensolver, SDCP, processes, validation."""
