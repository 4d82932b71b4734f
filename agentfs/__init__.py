"""agentfs: a Plan 9-style file server runtime for autonomous agents."""
