"""Every example runs with tiny settings (a smoke test; accuracy is tested elsewhere)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def test_eight_schools(capsys):
    import eight_schools

    summary = eight_schools.main(
        ["--num-steps", "5", "--num-samples", "50", "--num-particles", "2"]
    )
    out = capsys.readouterr().out
    assert "AutoFlowGuide" in out and "theta[7]" in out
    assert set(summary["AutoFlowGuide"]) == {"mu", "tau", *(f"theta[{j}]" for j in range(8))}
