"""jem_core: Joint Energy-based Models (Grathwohl et al., 2019) in PyTorch.

A classifier ``f(x) -> logits [N, K]`` is read as an energy-based model:
``E(x, y) = -f(x)[y]`` and ``E(x) = -logsumexp_y f(x)[y]`` ("Your classifier is
secretly an energy based model and you should treat it like one", ICLR 2020, eq. 4-5).

Modules, one per concept: :mod:`energy`, :mod:`models`, :mod:`data`, :mod:`images`,
:mod:`sampling`, :mod:`training`, :mod:`checkpoint`, :mod:`evaluation`, :mod:`likelihood`
(normalised ``log p(x)``: ``log Z`` by annealed importance sampling).
Images everywhere inside the library are ``[N, C, H, W]`` float32 in ``[-1, 1]``.

What does not live here: anything of Streamlit (the dashboard: ``app/``, ``pages/``) and the speed and
load benchmarks (``bench/``, tooling beside the library).
"""

__version__ = "0.1.0"
