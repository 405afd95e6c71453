"""The rollout server: fabric.v1.RolloutService over a RolloutEngine (engine.py: protocol and registry; vllm/: the
vLLM engine, the only code that touches vLLM)."""
