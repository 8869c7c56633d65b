"""The embedded agentic pair (``embedded://agent_*``, a calculator tool): its build and its
DAgger-trained teacher (docs/running.md, "Multi-turn tool use")."""
