"""EnvironmentService: multi-turn environments for tool-using agents, one session per episode.

    forgerpc serve environment --port 50071 max_sessions=4096 session_ttl_seconds=300

Layout: envs.py (the environments: seeded tasks, tool calls as tags in the agent's text, a
verifiable reward), server.py (sessions, validation, expiry), config.py.
"""
