"""Train the diffusion-hyperprior codec a little through its Python API, then code an image.

The training script (train_bk_sdm_compression.py) does this properly: data loading, schedules,
checkpoints, DDP. This is the smallest loop that shows the pieces:

    python examples/train_example.py --data_path ../shared/data/train --steps 200
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lic_common  # noqa: E402
from bk_sdm_compression import create_diffusion_hyperprior_model  # noqa: E402


def random_crops(files, size, batch):
    """A batch of random crops, from images at least ``size`` pixels on each side."""
    crops = []
    for i in torch.randint(len(files), (batch,)).tolist():
        x = lic_common.load_image(files[i])
        top = torch.randint(x.shape[1] - size + 1, ()).item()
        left = torch.randint(x.shape[2] - size + 1, ()).item()
        crops.append(x[:, top : top + size, left : left + size])
    return torch.stack(crops)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", required=True, help="folder of training images (each at least --crop px)")
    p.add_argument("--steps", type=int, default=200, help="training steps")
    p.add_argument("--N", type=int, default=64, help="channels of the transforms")
    p.add_argument("--M", type=int, default=96, help="latent channels")
    p.add_argument("--diffusion_steps", type=int, default=4, help="reverse steps of the masked-diffusion prior (groups of the latent revealed one by one)")
    p.add_argument("--crop", type=int, default=64, help="training crop size")
    p.add_argument("--lambda_rate", type=float, default=1.2e-3, help="rate weight (loss = MSE + lambda_rate * bpp)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    files = lic_common.list_images(args.data_path)
    model = create_diffusion_hyperprior_model(N=args.N, M=args.M, diffusion_steps=args.diffusion_steps, unet_channels=32)
    aux_params = [model.entropy_bottleneck.quantiles]
    main_params = [p for p in model.parameters() if all(p is not q for q in aux_params)]
    optimizer = torch.optim.Adam(main_params, lr=5e-4)
    aux_optimizer = torch.optim.Adam(aux_params, lr=1e-3)

    for step in range(args.steps):
        x = random_crops(files, args.crop, batch=8)
        out = model(x)
        bpp = lic_common.bpp_from_likelihoods(out["likelihoods"], x.shape[0] * args.crop**2)
        mse = torch.nn.functional.mse_loss(out["x_hat"], x)
        loss = mse + args.lambda_rate * bpp
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(main_params, 1.0)
        optimizer.step()
        aux_loss = model.aux_loss()  # fits the entropy bottleneck's quantiles
        aux_optimizer.zero_grad()
        aux_loss.backward()
        aux_optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  bpp {bpp.item():.3f}  mse {mse.item():.5f}")

    model.update(force=True)  # entropy coder tables from the trained distributions
    model.eval()
    x = lic_common.load_image(files[0])[None]
    with torch.no_grad():
        enc = model.compress(x)
        x_hat = model.decompress(enc["strings"], enc["shape"], digests=enc["digests"])["x_hat"]  # checks the latent
    bpp = 8 * sum(len(s[0]) for s in enc["strings"]) / (x.shape[-2] * x.shape[-1])
    psnr = lic_common.psnr(x, x_hat)
    print(f"{files[0].name}: {bpp:.3f} bpp (real bytes), PSNR {psnr:.2f} dB")
    return {"bpp": bpp, "psnr": psnr, "final_loss": loss.item()}


if __name__ == "__main__":
    main(sys.argv[1:])
