"""Progress bars for long steps (building models, compiling, benchmarking).

tqdm, drawn on stderr only when it is a terminal: logs and pipes stay clean.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable


def progress_bar(items: Iterable, description: str, enabled: bool = True, **kwargs):
    if not enabled or not sys.stderr.isatty():
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=description, leave=False, file=sys.stderr, **kwargs)
