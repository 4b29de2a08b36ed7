"""What the project prints, logs, records or stores shows no URL's secrets (issue 23 N8)."""
import json

import pytest

from vdvae_dist.artifacts.storage import redact, redact_all

SECRET = "pa/ss@w0rd"


@pytest.mark.parametrize("shown, want", [
    ("http://alice:s3cret@example.com:8080/runs/ema_fp32.pt", "http://***@example.com:8080/runs/ema_fp32.pt"),
    (f"https://alice:{SECRET}@mlflow.example.com/api", "https://***@mlflow.example.com/api"),  # '/' and '@' in it
    ("https://ghp_token@github.com/x/y", "https://***@github.com/x/y"),
    ("https://b.s3.amazonaws.com/k/ema_fp32.pt?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc&X-Amz-Expires=60",
     "https://b.s3.amazonaws.com/k/ema_fp32.pt?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=***"),
    ("http://host:5000/api?token=abc123", "http://host:5000/api?token=***"),
    ("https://host/cb#access_token=abc", "https://host/cb#***"),
    ("error reading 's3://KEY:SECRET@bucket/run/ema_fp32.pt': no such key",
     "error reading 's3://***@bucket/run/ema_fp32.pt': no such key"),
    ("two: http://u:p@a/x and s3://K:S@b/y.", "two: http://***@a/x and s3://***@b/y."),
])
def test_secrets_of_urls_are_hidden(shown, want):
    assert redact(shown) == want


@pytest.mark.parametrize("plain", ["s3://bucket/runs/model@v2/ema_fp32.pt", "file:///data/a@b/c.png",
                                   "sqlite:////tmp/mlruns/mlflow.db", "runs:/abc123/model/ema_fp32.pt",
                                   "/local/path/with@sign", "gs://bucket/shards/train-{000000..000009}.tar",
                                   "plain words, no URL: user:pass@host"])
def test_urls_without_secrets_and_other_text_are_unchanged(plain):
    assert redact(plain) == plain


def test_redact_all_reaches_nested_values_and_leaves_others():
    summary = {"weights": f"https://u:{SECRET}@h/w.pt", "step": 3, "data": ["s3://b/x?sig=1", 2.5],
               "nested": {"uri": "http://h/a?token=t"}}
    shown = json.dumps(redact_all(summary))
    assert "w0rd" not in shown and "sig=1" not in shown and "token=t" not in shown
    assert redact_all(summary)["step"] == 3 and summary["weights"].startswith("https://u:")  # a copy


def test_a_cli_error_shows_no_secret(capsys):
    from vdvae_dist.cli import main

    code = main(["evaluate", "--weights", f"file://alice:{SECRET}@/nonexistent/run?token=t0k"])
    err = capsys.readouterr().err
    assert code != 0 and "vdvae-dist: error:" in err
    assert "w0rd" not in err and "t0k" not in err, err
