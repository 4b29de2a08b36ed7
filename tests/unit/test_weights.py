"""The weights loader evaluation and serving share: URIs, formats, refusals."""
import fractions
import functools
import http.server
import threading

import pytest
import torch

from vdvae_dist.config import load, to_dict
from vdvae_dist.model import build_model
from vdvae_dist.artifacts.run_folder import LocalCheckpoints
from vdvae_dist.artifacts.run_folder import EXPORT_NAME
from vdvae_dist.artifacts.weights import export_dict, load_weights


@pytest.fixture
def export(tmp_path):
    cfg = load("tiny")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    torch.save(export_dict(to_dict(cfg), model.state_dict(), 7, {"test_bits_per_dim": 5.5}), tmp_path / EXPORT_NAME)
    return tmp_path, model


def test_file_folder_and_file_url_give_the_same_weights(export):
    folder, model = export
    for uri in (str(folder / EXPORT_NAME), str(folder), f"file://{folder}"):
        w = load_weights(uri)
        assert w.step == 7 and w.metrics == {"test_bits_per_dim": 5.5} and w.cfg.preset == "tiny"
        assert w.source.endswith(EXPORT_NAME) and not w.model.training
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in w.model.state_dict().items())


def test_single_process_checkpoint_folder_follows_latest(tmp_path, export):
    folder, model = export
    state = torch.load(folder / EXPORT_NAME, weights_only=True)
    LocalCheckpoints(tmp_path / "checkpoints", keep=2).save(
        12, lambda folder: torch.save({**state, "step": 12}, folder / EXPORT_NAME), {})
    assert load_weights(str(tmp_path / "checkpoints")).step == 12


def test_refusals_name_the_uri(tmp_path):
    with pytest.raises(ValueError, match="does not exist; allowed: .*runs:/"):
        load_weights(str(tmp_path / "nowhere.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt' is not a weights-only torch file"):
        load_weights(str(tmp_path / "junk.pt"))
    torch.save({"ema": {}}, tmp_path / "noconfig.pt")
    with pytest.raises(ValueError, match="holds no EMA weights with their config"):
        load_weights(str(tmp_path / "noconfig.pt"))
    # arbitrary objects are never unpickled
    torch.save({"config": {}, "ema": {}, "extra": fractions.Fraction(1, 3)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="not a weights-only torch file"):
        load_weights(str(tmp_path / "pickled.pt"))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_weights_over_http_with_credentials_never_show_them(export):
    """A real HTTP server (stdlib, ignores the credentials): the URI's user:password part is
    neither in Weights.source nor in the error for a missing file."""
    folder, _ = export
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://reader:hunter2-secret@127.0.0.1:{server.server_port}"
    try:
        w = load_weights(f"{base}/{EXPORT_NAME}")
        assert w.step == 7 and w.source == f"http://***@127.0.0.1:{server.server_port}/{EXPORT_NAME}"
        with pytest.raises(ValueError, match=r"http://\*\*\*@127\.0\.0\.1") as e:
            load_weights(f"{base}/no-such/{EXPORT_NAME}")
        assert "hunter2" not in str(e.value)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
