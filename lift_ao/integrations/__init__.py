"""Entry points for other frameworks.

- :mod:`lift_ao.integrations.hf`: Hugging Face transformers ``from_pretrained``/``save_pretrained``
  (registered with transformers when ``lift_ao`` is imported).
- :mod:`lift_ao.integrations.torchtune`: ``LiftQuantQuantizer`` for torchtune recipe configs.
- :mod:`lift_ao.integrations.torchchat`: ``LiftQuantHandler`` for torchchat's ``--quantize`` JSON.

The torchtune and torchchat modules import neither framework unless asked to register with it.
"""
