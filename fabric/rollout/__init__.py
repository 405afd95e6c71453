"""The rollout server: fabric.v1.RolloutService on vLLM (engine.py is the only module that touches vLLM)."""
