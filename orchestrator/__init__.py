"""forgerpc apps (grpo, sft), the local stack launcher and the `forgerpc` CLI.

Talks to services only through `forgerpc.clients`; starts them only as OS processes.
"""
