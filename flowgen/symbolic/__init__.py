"""Stage 2: symbolic derivation — the step map, state classes, stability, drift."""
