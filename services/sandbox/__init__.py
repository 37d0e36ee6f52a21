"""SandboxService: runs untrusted code with no network, an unprivileged uid and resource limits.

    forgerpc serve sandbox --port 50061 workers=4            # as root, with bubblewrap installed

Layout: config.py (limits, pool, tier), isolation.py (tiers and their command lines),
seccomp.py (the syscall filter), executor.py (one run: spawn, pump, verdict, cleanup),
server.py (validation, the bounded worker pool). Its spec is tests/test_sandbox_hostile.py.
The strongest tier needs Debian's `bubblewrap` (`apt-get install -y bubblewrap`) and root;
without them the service still runs, with fewer layers, and says which in every response.
"""
