"""`wb verify`: structure, published checksums and the weight-sum of a checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import CheckFailed
from workbench.io.hashing import hash_files, parse_checksum_file
from workbench.io.reader import open_checkpoint
from workbench.io.weightsum import checkpoint_weight_sum
from workbench.progress import progress_bar


@dataclass
class VerifyResult:
    path: str
    tensors: int
    weight_files: list[str]
    checksums: dict[str, str] = field(default_factory=dict)  # name -> ok | mismatch | missing
    checksum_algo: str | None = None
    weight_sum: dict[str, float | bool] | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def lines(self) -> list[str]:
        shown = [f"structure: ok ({self.tensors} tensors in {len(self.weight_files)} file(s))"]
        shown += [f"{name}: {'OK' if state == 'ok' else state.upper()}" for name, state in self.checksums.items()]
        if self.weight_sum is not None:
            ws = self.weight_sum
            shown.append(f"weight-sum: {ws['found']:.6f} (expected {ws['expected']:.6f}, difference {ws['difference']:+.3g})")
        return shown

    def error(self) -> CheckFailed | None:
        """The failure `wb verify` ends with (each failed check a FAILED line, exit 1), or None."""
        return None if self.ok else CheckFailed(self.failures, self.path)

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "ok": self.ok,
            "structure": "ok",
            "tensors": self.tensors,
            "weight_files": self.weight_files,
            "checksum_algo": self.checksum_algo,
            "checksums": self.checksums,
            "weight_sum": self.weight_sum,
            "failures": self.failures,
        }


def verify(
    path: Path,
    checksums: Path | None = None,
    expected_sum: float | None = None,
    atol: float = 1e-2,
    jobs: int | None = None,
) -> VerifyResult:
    """Structure always (opening validates every index entry, header and byte range); the
    checksum list and the weight-sum when given. Failures are collected, not raised: the result
    is printed first, then `error()` ends the command."""
    path = Path(path)
    checkpoint = open_checkpoint(path)  # raises WorkbenchError on any structural fault
    result = VerifyResult(str(path), len(checkpoint), checkpoint.weight_files)
    if checksums is not None:
        _check_list(path if path.is_dir() else path.parent, Path(checksums), result, jobs)
    if expected_sum is not None:
        with progress_bar(checkpoint.total_bytes, "weight-sum") as bar:
            found = checkpoint_weight_sum(checkpoint, on_bytes=bar.update)
        difference = found - expected_sum
        ok = abs(difference) <= atol
        result.weight_sum = {"expected": expected_sum, "found": found, "difference": difference, "atol": atol, "ok": ok}
        if not ok:
            result.failures.append(
                f"weight-sum {found:.6f} differs from the expected {expected_sum:.6f} by {difference:+.6g} (atol {atol:g})"
            )
    return result


def _check_list(root: Path, list_file: Path, result: VerifyResult, jobs: int | None) -> None:
    algo, expected = parse_checksum_file(list_file)
    result.checksum_algo = algo
    present = {name: root / name for name in expected if (root / name).is_file()}  # names checked by the parser
    total = sum(p.stat().st_size for p in present.values())
    with progress_bar(total, f"{algo} check") as bar:
        digests = dict(zip(present, hash_files(list(present.values()), algo, jobs or os.cpu_count() or 1, bar.update)))
    for name, digest in expected.items():
        if name not in digests:
            result.checksums[name] = "missing"
            result.failures.append(f"{name}: missing")
        elif digests[name] != digest:
            result.checksums[name] = "mismatch"
            result.failures.append(f"{name}: {algo} mismatch (expected {digest}, found {digests[name]})")
        else:
            result.checksums[name] = "ok"
