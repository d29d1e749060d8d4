"""The orchestrator service: the only stateful brain. Owns runs and drives the steps through the others."""
