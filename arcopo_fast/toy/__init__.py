"""The toy world: a procedural text-to-video world, a few-step streaming generator trained on it, and toy
reward models in VideoAlign's three dimensions, all small enough to train and align on a CPU.

    python -m arcopo_fast.toy build        # rebuild every shipped weight (about 30 min on 2 cores)
    python -m arcopo_fast.toy measure      # the base model's reward spreads and TA recognition rate
    python -m arcopo_fast.toy reproduce    # the paper's claims side by side (reproduce.py)
    python -m arcopo_fast.train            # the default run: AR-CoPO aligns the toy model

Modules: world (scenes, prompts, rendering), base (teacher forcing, ODE targets, the student),
reward_models (training the rewards of arcopo_fast.rewards.toy), build (the whole recipe), measure,
assets (shipped files and their manifest). Importing this package imports nothing heavy.
"""
