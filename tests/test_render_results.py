"""The segmentation tables of README / RESULTS are the ones benchmarks/render_results.py makes
from the committed JSON files (a hand edit, or a JSON re-measured without re-rendering, fails)."""
from __future__ import annotations

from benchmarks import render_results


def test_splice_replaces_only_between_its_own_markers():
    text = "a\n<!-- results:x -->\nold\n<!-- results:x:end -->\nb\n"
    assert render_results.splice(text, "x", "new") == "a\n<!-- results:x -->\nnew\n<!-- results:x:end -->\nb\n"
    assert render_results.splice(text, "y", "new") == text


def test_committed_tables_match_their_files():
    blocks = render_results.render()
    assert set(blocks) == set(render_results.BLOCKS)            # every JSON is committed
    results_md = render_results.DOCS[1].read_text()
    assert all(f"<!-- results:{name} -->" in results_md for name in blocks)   # and has its place
    for doc in render_results.DOCS:
        text = doc.read_text()
        for name, block in blocks.items():
            assert render_results.splice(text, name, block) == text, f"{doc.name}: block {name} is stale; " \
                "run python benchmarks/render_results.py"
