"""forgerpc services: one folder per service, plus `common/` (the shared server runtime).

Start any of them with `forgerpc serve <name>` (or `python -m forgerpc.services serve <name>`).
"""
