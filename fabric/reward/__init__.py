"""The reward server: rule rewards (math-verify, the toy task's answer tag) and HF reward models, scored in batches
over fabric.v1.RewardService. `client.RewardClient` is the caller's side."""
