"""Applications of the probe inside trainers. Each submodule imports its trainer library lazily, so the
core (``import entropy_probe``) never needs them: ``entropy_probe.integrations.trl`` needs ``transformers``
(and works with TRL's trainers: ``pip install entropy-probe[trl]``); ``entropy_probe.integrations.verl``
(and ``verl_batch``, ``verl_config``, ``verl_ray``) needs verl 0.9.1 (``pip install entropy-probe[verl]``)."""
