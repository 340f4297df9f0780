"""JEM Explorer: the Streamlit entry point (``streamlit run app/Home.py``).

Sets up the page, draws the shared sidebar (model, baseline, dataset, data root) and wires the pages
of the top-level ``pages/`` folder with ``st.navigation``.

What does not live here: the sidebar (``app/registry.py``), page plumbing and the page list (``app/ui.py``),
the pages themselves (``pages/``).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so that the pages can import jem_core and app.ui
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import ui  # noqa: E402

st.set_page_config(page_title="JEM Explorer", page_icon=":material/bolt:", layout="wide")
# Narrow screens: long formulas scroll inside their line instead of pushing the page wider.
st.html("<style>.stMarkdown .katex { max-width: 100%; overflow-x: auto; overflow-y: hidden; "
        "display: inline-block; vertical-align: middle; }</style>")
pages = st.navigation(ui.make_pages())
try:
    ui.sidebar()
except Exception as e:  # noqa: BLE001 - a broken sidebar must not take the pages down
    st.sidebar.error(f"The model picker failed: {type(e).__name__}: {e}")
ui.warm_up(ui.context())  # once per server: what first visits would otherwise wait for, computed in the background
pages.run()
