"""Define, train, update and evaluate your own CompressionModel: the way to learn CompressAI.

A three-layer convolution + GDN encoder and decoder around an EntropyBottleneck (the
factorized prior of Balle et al. 2018), trained with the rate-distortion loss and the auxiliary
optimizer of the bottleneck's quantiles, then updated and measured with real bitstreams.

    python examples/custom_model_example.py --data_path ../shared/data/train --steps 300
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lic_common  # noqa: E402  (before CompressAI: it imports it without a FutureWarning)
from compressai.entropy_models import EntropyBottleneck  # noqa: E402
from compressai.layers import GDN  # noqa: E402
from compressai.models import CompressionModel  # noqa: E402
from train_example import random_crops  # noqa: E402


class Network(CompressionModel):
    """x (B,3,H,W) -> y (B,N,H/8,W/8) -> EntropyBottleneck -> y_hat -> x_hat. H, W: multiples of 8."""

    def __init__(self, N=64):
        super().__init__()
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.encode = nn.Sequential(
            nn.Conv2d(3, N, 5, stride=2, padding=2), GDN(N),
            nn.Conv2d(N, N, 5, stride=2, padding=2), GDN(N),
            nn.Conv2d(N, N, 5, stride=2, padding=2),
        )  # fmt: skip
        self.decode = nn.Sequential(
            nn.ConvTranspose2d(N, N, 5, stride=2, output_padding=1, padding=2), GDN(N, inverse=True),
            nn.ConvTranspose2d(N, N, 5, stride=2, output_padding=1, padding=2), GDN(N, inverse=True),
            nn.ConvTranspose2d(N, 3, 5, stride=2, output_padding=1, padding=2),
        )  # fmt: skip

    def forward(self, x):
        y = self.encode(x)
        y_hat, y_likelihoods = self.entropy_bottleneck(y)  # noise in training, rounding in eval
        return {"x_hat": self.decode(y_hat), "likelihoods": {"y": y_likelihoods}}

    def compress(self, x):
        y = self.encode(x)
        return {"strings": [self.entropy_bottleneck.compress(y)], "shape": y.size()[-2:]}

    def decompress(self, strings, shape):
        y_hat = self.entropy_bottleneck.decompress(strings[0], shape)
        return {"x_hat": self.decode(y_hat).clamp(0, 1)}


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", required=True, help="folder of training images")
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--N", type=int, default=64, help="channels")
    p.add_argument("--lmbda", type=float, default=0.013, help="CompressAI's convention: loss = lmbda * 255^2 * MSE + bpp")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    files = lic_common.list_images(args.data_path)
    net = Network(args.N)
    parameters = [p for n, p in net.named_parameters() if not n.endswith(".quantiles")]
    aux_parameters = [p for n, p in net.named_parameters() if n.endswith(".quantiles")]
    optimizer = torch.optim.Adam(parameters, lr=1e-3)
    aux_optimizer = torch.optim.Adam(aux_parameters, lr=1e-3)

    for step in range(args.steps):
        x = random_crops(files, 64, batch=8)
        out = net(x)
        bpp = lic_common.bpp_from_likelihoods(out["likelihoods"], x.shape[0] * 64 * 64)
        loss = args.lmbda * 255**2 * nn.functional.mse_loss(out["x_hat"], x) + bpp
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        aux_loss = net.aux_loss()
        aux_optimizer.zero_grad()
        aux_loss.backward()
        aux_optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  bpp {bpp.item():.3f}  aux {aux_loss.item():.1f}")

    net.update(force=True)  # build the entropy coder's CDF tables
    net.eval()
    x = lic_common.load_image(files[0])[None]
    x = x[..., : x.shape[-2] // 8 * 8, : x.shape[-1] // 8 * 8]
    with torch.no_grad():
        enc = net.compress(x)
        x_hat = net.decompress(enc["strings"], enc["shape"])["x_hat"]
    bpp = 8 * len(enc["strings"][0][0]) / (x.shape[-2] * x.shape[-1])
    psnr = lic_common.psnr(x, x_hat)
    print(f"{files[0].name}: {bpp:.3f} bpp (real bytes), PSNR {psnr:.2f} dB")
    return {"bpp": bpp, "psnr": psnr}


if __name__ == "__main__":
    main(sys.argv[1:])
