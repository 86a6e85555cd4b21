"""bench/pack_switch.py on the suite's base bundle and its two packs, with few copies and rounds."""

from __future__ import annotations

import json

import pack_switch


def test_pack_switch_reports_memory_and_switch_times(packs, nectar_bundle, tmp_path):
    code = pack_switch.main(["--base", str(packs["base"]), "--pack", f"manual={packs['manual']}",
                             "--pack", f"whole={packs['whole']}", "--copies", "2", "--rounds", "12",
                             "--compare", str(nectar_bundle),
                             "--out", str(tmp_path)])
    report = json.loads((tmp_path / "pack_switch.json").read_text())
    assert code == 0 and report["answers_unchanged_after_switches"] == {"manual": True, "whole": True}
    assert [row["packs"] for row in report["memory"]] == [1, 4]
    assert 0 < report["switch_ms"]["median"] <= report["switch_ms"]["max"]
    assert (tmp_path / "pack_switch.png").stat().st_size > 0
    assert report["ms_per_step"]["bundle"] > 0 and report["ms_per_step"]["base_and_pack"] > 0
