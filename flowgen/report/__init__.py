"""Stage 6: reports — terminal (rich), LaTeX, JSON and figures.

Only this stage and the CLI print.
"""
