"""Checkpoint files: exact round trip, content addressing, refusal of altered or foreign files."""

from __future__ import annotations

import ast
import hashlib
import pickle
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from forecaster import checkpoints as C
from forecaster.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from forecaster.errors import CheckpointError

# Floats whose shortest repr is long or denormal: they must come back bit for bit.
SCALERS = {"EWR": (0.1 + 0.2, 1e-300), "JFK": (5e-324, 123456.789012345678), "LGA/UA": (-0.0, 1.0)}


class _Net(nn.Module):
    """A small stateful LSTM forecaster, as the real ones are shaped."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=3, hidden_size=8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)  # (batch, time, hidden)
        return self.head(out)  # (batch, time, 2)


def _ckpt(net: nn.Module | None = None) -> Checkpoint:
    torch.manual_seed(0)
    net = net or _Net()
    return Checkpoint(
        kind="lstm",
        config={"hidden": 8, "layers": 1, "quantiles": [0.1, 0.5, 0.9], "name": "é✓"},
        state_dict=net.state_dict(),
        scalers=SCALERS,
        meta={"epochs": 3, "val_mase": 0.8123456789, "series": ["EWR", "JFK"]},
    )


def _flip(path: Path, offset: int) -> None:
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)  # checkpoints are written read-only
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def no_parse(monkeypatch):
    """Fail the test if anything gets as far as parsing the file."""

    def _parse(*_a, **_k):
        pytest.fail("the file was parsed before its sha256 was checked")

    monkeypatch.setattr(C, "_parse", _parse)


def test_round_trip_is_exact(tmp_path):
    ckpt = _ckpt()
    uri, sha = save_checkpoint(ckpt, tmp_path)
    got = load_checkpoint(uri, sha)
    assert (got.kind, got.config, got.meta) == (ckpt.kind, ckpt.config, ckpt.meta)
    assert got.scalers == SCALERS
    for name, (c, s) in SCALERS.items():  # bit for bit, sign of zero included
        assert [x.hex() for x in got.scalers[name]] == [c.hex(), s.hex()]
    assert got.state_dict.keys() == ckpt.state_dict.keys()
    for k, t in ckpt.state_dict.items():
        assert got.state_dict[k].dtype == t.dtype
        assert torch.equal(got.state_dict[k], t)


def test_a_model_loaded_from_it_forecasts_identically(tmp_path):
    torch.manual_seed(1)
    net = _Net().eval()
    uri, sha = save_checkpoint(_ckpt(net), tmp_path)
    fresh = _Net().eval()
    fresh.load_state_dict(load_checkpoint(uri, sha).state_dict)
    x = torch.randn(4, 24, 3)  # (batch, time, features)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))


def test_layout_uri_and_read_only_file(tmp_path):
    uri, sha = save_checkpoint(_ckpt(), tmp_path / "a dir")  # a space: the uri is quoted
    path = tmp_path / "a dir" / sha[:2] / f"{sha}.safetensors"
    assert uri == path.as_uri() and uri.startswith("file:///") and "%20" in uri
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    assert not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    assert load_checkpoint(str(path), sha).kind == "lstm"  # a plain path works too


def test_same_checkpoint_twice_same_address(tmp_path):
    first = save_checkpoint(_ckpt(), tmp_path)
    mtime = Path(C.local_path(first[0])).stat().st_mtime_ns
    # Equal content built in another key order, on a non-contiguous tensor: same bytes.
    other = _ckpt()
    other = Checkpoint(
        kind=other.kind,
        config=dict(reversed(list(other.config.items()))),
        state_dict={
            k: v.t().contiguous().t() if v.dim() == 2 else v for k, v in other.state_dict.items()
        },
        scalers=other.scalers,
        meta=other.meta,
    )
    assert save_checkpoint(other, tmp_path) == first
    assert Path(C.local_path(first[0])).stat().st_mtime_ns == mtime  # reused, not rewritten


def test_different_content_different_address(tmp_path):
    a = _ckpt()
    b = Checkpoint(a.kind, a.config, a.state_dict, a.scalers, {**a.meta, "epochs": 4})
    assert save_checkpoint(a, tmp_path)[1] != save_checkpoint(b, tmp_path)[1]


def test_tied_weights_and_empty_state_dict_are_saved(tmp_path):
    w = torch.randn(3, 3, requires_grad=True)
    ckpt = Checkpoint("rnn", {}, {"a": w, "b": w, "c": w[0]}, {})
    got = load_checkpoint(*save_checkpoint(ckpt, tmp_path))
    assert torch.equal(got.state_dict["b"], w.detach()) and torch.equal(
        got.state_dict["c"], w[0].detach()
    )
    empty = load_checkpoint(*save_checkpoint(Checkpoint("gru", {}, {}, {}), tmp_path))
    assert empty.state_dict == {} and empty.meta == {}


@pytest.mark.parametrize("where", ["header", "weights"])
def test_a_tampered_file_is_refused_before_parsing(tmp_path, no_parse, where):
    uri, sha = save_checkpoint(_ckpt(), tmp_path)
    path = C.local_path(uri)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    offset = 8 + header_len // 2 if where == "header" else path.stat().st_size - 5
    assert (offset < 8 + header_len) == (where == "header")
    _flip(path, offset)
    with pytest.raises(CheckpointError, match="sha256 of the file is .* the registry expects"):
        load_checkpoint(uri, sha)


def test_a_wrong_sha_is_refused(tmp_path, no_parse):
    uri, sha = save_checkpoint(_ckpt(), tmp_path)
    with pytest.raises(CheckpointError, match="altered or replaced"):
        load_checkpoint(uri, hashlib.sha256(b"other").hexdigest())
    with pytest.raises(CheckpointError, match="not a sha256 hex digest"):
        load_checkpoint(uri, sha[:-1])


def test_a_missing_file_is_refused_with_its_path(tmp_path):
    uri, sha = save_checkpoint(_ckpt(), tmp_path)
    path = C.local_path(uri)
    path.unlink()
    with pytest.raises(CheckpointError, match="no such file") as err:
        load_checkpoint(uri, sha)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("uri", ["s3://bucket/x.safetensors", "https://h/x", "file://host/x"])
def test_only_local_paths_are_supported(uri):
    with pytest.raises(CheckpointError, match="scheme|host"):
        load_checkpoint(uri, "0" * 64)


def test_a_pickle_is_never_unpickled(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"

    class Bomb:
        def __reduce__(self):
            return (Path.touch, (marker,))

    payload = pickle.dumps({"lstm.weight": Bomb()})
    sha = hashlib.sha256(payload).hexdigest()
    path = tmp_path / sha[:2] / f"{sha}.safetensors"
    path.parent.mkdir()
    path.write_bytes(payload)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads was called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load was called"))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(path.as_uri(), sha)
    assert not marker.exists()
    monkeypatch.undo()
    pickle.loads(payload)  # the bomb is live: unpickling it would have run code
    assert marker.exists()


def test_a_safetensors_file_of_someone_else_is_refused(tmp_path):
    import safetensors.torch

    data = safetensors.torch.save({"w": torch.zeros(2)})
    path = tmp_path / "foreign.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="not a forecaster checkpoint"):
        load_checkpoint(str(path), hashlib.sha256(data).hexdigest())


def test_unserialisable_content_is_refused_on_save(tmp_path):
    bad = Checkpoint("lstm", {"activation": torch.tanh}, {}, {})
    with pytest.raises(CheckpointError, match="not plain JSON"):
        save_checkpoint(bad, tmp_path)
    with pytest.raises(CheckpointError, match="not plain JSON"):
        save_checkpoint(Checkpoint("lstm", {}, {}, {"a": (float("nan"), 1.0)}), tmp_path)
    assert not any(tmp_path.iterdir())


def test_the_module_cannot_unpickle():
    """No pickle import and no torch.load call anywhere in the checkpoints module."""
    tree = ast.parse(Path(C.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = {a.name for a in node.names} | {getattr(node, "module", None) or ""}
            assert not names & {"pickle", "dill", "cloudpickle", "joblib"}, ast.dump(node)
        if isinstance(node, ast.Attribute):
            assert node.attr != "load" or ast.unparse(node) == "safetensors.torch.load", (
                ast.unparse(node)
            )


def test_the_challengers_state_is_a_tensor_not_header_text(tmp_path):
    """The MSTL challenger's per-series state rides as a tensor of its own: the JSON header
    stays small whatever the fleet (at 100,000 series its text passed safetensors' 100 MB
    header limit and the version could not be saved), and it comes back bit for bit, out
    of the model's state_dict."""
    import numpy as np

    rng = np.random.default_rng(0)
    state = rng.normal(size=(2000, 195)) * 1e3
    ckpt = _ckpt()
    stat = {"params": {"seasons": [24, 168]}, "state": state.tolist(), "step": [7] * 2000}
    ckpt = Checkpoint(ckpt.kind, ckpt.config, ckpt.state_dict, ckpt.scalers, {"stat": stat})
    uri, sha = save_checkpoint(ckpt, tmp_path)
    data = next(tmp_path.rglob("*.safetensors")).read_bytes()
    assert int.from_bytes(data[:8], "little") < 200_000  # the state's text would be ~8 MB
    got = load_checkpoint(uri, sha)
    assert got.state_dict.keys() == ckpt.state_dict.keys()
    assert np.array_equal(np.asarray(got.meta["stat"]["state"]), state)
    assert got.meta["stat"]["step"] == [7] * 2000 and got.meta["stat"]["params"] == stat["params"]
    # Saved again as loaded (an array now), the same bytes: the same address.
    assert save_checkpoint(got, tmp_path / "again")[1] == sha
