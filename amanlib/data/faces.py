"""A procedural face model for the synthetic datasets: textured faces per subject, facial actions as smooth
displacement fields at the real places, and a warp that applies sub-pixel motion faithfully.

Coordinates are normalised: x in [-1, 1] left to right, y in [-1, 1] top to bottom; images are square.
Edges are drawn soft (about 1.5 px) so the rendered face is band-limited and a bilinear warp moves it by
sub-pixel amounts without aliasing. Rendering is vectorised over subjects (a batch of FaceParams).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

EMOTION_AUS = {"happiness": "6+12", "surprise": "1+2", "disgust": "4", "repression": "15+17"}
"""Each emotion of the synthetic CASME II sheet and the action units it shows (FACS codes as in the sheet)."""

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class FaceParams:
    """One subject's face: geometry (normalised units), colours (RGB in [0, 1]) and texture strengths."""
    face_cx: float
    face_cy: float
    face_rx: float
    face_ry: float
    hairline: float
    eye_y: float
    eye_dx: float
    eye_rx: float
    eye_ry: float
    brow_y: float
    brow_len: float
    brow_thick: float
    brow_arch: float
    nose_y: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip_upper: float
    lip_lower: float
    light: float
    tex_fine: float
    tex_medium: float
    tex_blotch: float
    skin: RGB
    hair: RGB
    iris: RGB
    lips: RGB
    background: RGB
    noise_seed: int


def sample_face(rng: np.random.Generator) -> FaceParams:
    """Draw a subject: face shape and feature placement, skin tone (light to dark), hair, texture."""
    u = rng.uniform
    eye_y = u(-0.24, -0.12)
    nose_y = eye_y + u(0.30, 0.38)
    tone = u(0.0, 1.0)
    skin = np.clip((np.array([0.93, 0.78, 0.67]) * (1 - tone) + np.array([0.45, 0.30, 0.22]) * tone)
                   * u(0.95, 1.05, 3), 0, 1)
    rgb = lambda a: tuple(float(v) for v in np.clip(a, 0, 1))  # noqa: E731
    return FaceParams(
        face_cx=u(-0.03, 0.03), face_cy=u(0.02, 0.08), face_rx=u(0.70, 0.82), face_ry=u(0.90, 1.0),
        hairline=u(-0.85, -0.68), eye_y=eye_y, eye_dx=u(0.29, 0.36), eye_rx=u(0.11, 0.15), eye_ry=u(0.045, 0.065),
        brow_y=eye_y - u(0.13, 0.19), brow_len=u(0.15, 0.21), brow_thick=u(0.025, 0.045), brow_arch=u(0.02, 0.06),
        nose_y=nose_y, nose_w=u(0.09, 0.13), mouth_y=nose_y + u(0.20, 0.27), mouth_w=u(0.19, 0.27),
        lip_upper=u(0.025, 0.045), lip_lower=u(0.035, 0.06), light=u(-0.3, 0.3),
        tex_fine=u(0.01, 0.03), tex_medium=u(0.015, 0.04), tex_blotch=u(0.015, 0.035),
        skin=rgb(skin), hair=rgb(np.array([0.22, 0.16, 0.11]) * u(0.3, 1.2) + u(0.0, 0.04)),
        iris=rgb(np.array([0.30, 0.20, 0.12]) * u(0.4, 1.3)),
        lips=rgb(skin * np.array([0.95, 0.62, 0.62]) * u(0.85, 1.0)),
        background=rgb(np.full(3, u(0.30, 0.70)) + u(-0.04, 0.04, 3)), noise_seed=int(rng.integers(2**31)),
    )


def _batch(params: Sequence[FaceParams]) -> SimpleNamespace:
    """Fields of B faces as tensors that broadcast against [B, C, H, W]: scalars [B, 1, 1, 1], RGB [B, 3, 1, 1]."""
    out = {}
    for f in fields(FaceParams):
        if f.name == "noise_seed":
            continue
        values = torch.tensor([getattr(p, f.name) for p in params], dtype=torch.float32)
        out[f.name] = values.view(len(params), -1, 1, 1)
    return SimpleNamespace(**out)


def coordinate_grid(n: int, width: int | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (y, x), each [1, 1, n, width (default n)], in the normalised frame (each axis
    spans [-1, 1], grid_sample's align_corners=False convention)."""
    cy, cx = ((torch.arange(m, dtype=torch.float32, device=device) + 0.5) / m * 2 - 1 for m in (n, width or n))
    y, x = torch.meshgrid(cy, cx, indexing="ij")
    return y[None, None], x[None, None]


def blur(images: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] images (reflect padding)."""
    radius = max(1, int(round(3 * sigma_px)))
    t = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (t / sigma_px) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="reflect"),
                   kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"),
                    kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _smooth_noise(seeds: Sequence[int], n: int, sigmas_px: Sequence[float]) -> torch.Tensor:
    """Per face (its own seed), Gaussian-filtered white noise at each scale with unit std: [B, S, n, n].
    Coarse scales are drawn on a smaller grid and upsampled (same look, a fraction of the cost)."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    layers = []
    for sigma in sigmas_px:
        factor = max(1, int(sigma // 3))
        m = -(-n // factor)
        noise = blur(torch.stack([torch.randn(1, m, m, generator=g) for g in gens]), sigma / factor)
        if factor > 1:
            noise = F.interpolate(noise, scale_factor=factor, mode="bicubic", align_corners=False)[..., :n, :n]
        layers.append(noise / noise.std(dim=(2, 3), keepdim=True))
    return torch.cat(layers, dim=1)


def _soft(signed: torch.Tensor, width: float) -> torch.Tensor:
    """Soft inside-mask from a signed distance (positive inside), edge `width` normalised units."""
    return torch.sigmoid(signed / width)


def _gauss(dx: torch.Tensor, dy: torch.Tensor, sx, sy) -> torch.Tensor:
    return torch.exp(-((dx / sx) ** 2 + (dy / sy) ** 2))


def _segment_distance(y, x, y0, x0, y1, x1):
    """Distance of every pixel to the segment (y0, x0)-(y1, x1)."""
    dy, dx = y1 - y0, x1 - x0
    t = (((y - y0) * dy + (x - x0) * dx) / (dy * dy + dx * dx)).clamp(0, 1)
    return torch.hypot(y - (y0 + t * dy), x - (x0 + t * dx))


def render_faces(params: Sequence[FaceParams], n: int) -> torch.Tensor:
    """Neutral faces, eyes open and closed (same texture): [B, 2, 3, n, n] in [0, 1]."""
    p = _batch(params)
    y, x = coordinate_grid(n)
    px = 2.0 / n  # one pixel in normalised units
    edge = 1.5 * px
    noise = _smooth_noise([q.noise_seed for q in params], n, [0.5 * n / 128, 1.5 * n / 128, 6 * n / 128,
                                                              0.8 * n / 128])
    fine, medium, blotch, strands = noise.split(1, dim=1)  # B, 1, n, n each
    texture = 1 + p.tex_fine * fine + p.tex_medium * medium + p.tex_blotch * blotch
    img = p.background * (1 + 0.03 * medium)

    rr = ((x - p.face_cx) / p.face_rx) ** 2 + ((y - p.face_cy) / p.face_ry) ** 2
    shade = (1 - 0.35 * rr.clamp(max=1.2) ** 3) * (1 + p.light * (x - p.face_cx) * 0.25)
    img = torch.lerp(img, p.skin * shade * texture, _soft(1 - rr, 0.02))

    folds = sum(torch.exp(-(_segment_distance(y, x, p.nose_y - 0.02, s * p.nose_w * 1.15,
                                              p.mouth_y + 0.04, s * p.mouth_w * 1.18) / 0.018) ** 2)
                for s in (-1, 1))
    img = img * (1 - 0.12 * folds)

    head = ((x - p.face_cx) / (p.face_rx * 1.12)) ** 2 + ((y - p.face_cy + 0.03) / (p.face_ry * 1.08)) ** 2
    hair_edge = p.hairline + 0.05 * torch.cos(x * 3.0) - 0.10 * x.abs()
    hair = _soft(1 - head, 0.02) * torch.maximum(_soft(hair_edge - y, 0.015),
                                                 _soft(rr - 1, 0.02) * _soft(p.eye_y - y, 0.05))  # cap and sides
    img = torch.lerp(img, p.hair * (1 + 0.25 * fine + 0.15 * strands), hair)

    for s in (-1, 1):
        t = (x - s * p.eye_dx) / p.brow_len  # -1 .. 1 along the brow
        centre = p.brow_y + p.brow_arch * t ** 2 - 0.01 * s * t
        thick = p.brow_thick * (1.15 - 0.45 * (s * t + 1) / 2)  # thicker at the inner end
        brow = _soft(thick / 2 - (y - centre).abs(), edge) * _soft(1 - t.abs(), 0.08)
        img = torch.lerp(img, p.hair * (1 + 0.3 * fine), 0.85 * brow)

    nostrils = sum(_gauss(x - s * p.nose_w * 0.55, y - p.nose_y, 0.035, 0.018) for s in (-1, 1))
    ridge = torch.exp(-((x / 0.03) ** 2)) * _soft(y - p.eye_y, 0.03) * _soft(p.nose_y - 0.04 - y, 0.03)
    sides = sum(torch.exp(-(((x - s * p.nose_w * 0.75) / 0.025) ** 2)) for s in (-1, 1))
    sides = sides * _soft(y - (p.eye_y + 0.1), 0.04) * _soft(p.nose_y - y, 0.02)
    img = img * (1 - 0.55 * nostrils) * (1 + 0.08 * ridge) * (1 - 0.10 * sides)

    t = (x / p.mouth_w).clamp(-1, 1)
    line = p.mouth_y - 0.012 * (1 - t ** 2)  # lip line, corners slightly lower than the centre
    taper = (1 - t ** 2).clamp(min=0).sqrt()
    inside = _soft(1 - x.abs() / p.mouth_w, 0.03)
    upper = _soft(y - (line - p.lip_upper * taper), edge) * _soft(line - y, edge) * inside
    lower = _soft(line + p.lip_lower * taper - y, edge) * _soft(y - line, edge) * inside
    img = torch.lerp(img, p.lips * (1 + 0.5 * p.tex_fine * fine), 0.9 * (upper + lower).clamp(max=1))
    mouth_line = torch.exp(-(((y - line) / (1.2 * px + 0.004)) ** 2)) * _soft(1.04 - x.abs() / p.mouth_w, 0.02)
    corners = sum(_gauss(x - s * p.mouth_w, y - p.mouth_y, 0.025, 0.015) for s in (-1, 1))
    img = img * (1 - 0.6 * mouth_line) * (1 - 0.35 * corners)

    closed = img
    white = torch.tensor([0.88, 0.86, 0.83]).view(1, 3, 1, 1) * (1 + 0.5 * p.tex_fine * fine)
    for s in (-1, 1):
        dx, dy = x - s * p.eye_dx, y - p.eye_y
        socket = _gauss(dx, dy + 0.01, p.eye_rx * 1.5, p.eye_ry * 2.4)
        img, closed = img * (1 - 0.12 * socket), closed * (1 - 0.14 * socket)
        eye = _soft(1 - (dx / p.eye_rx) ** 2 - (dy / p.eye_ry) ** 2, 0.08)
        iris_d = torch.hypot(dx, dy) / (p.eye_ry * 1.15)
        iris, pupil = _soft(1 - iris_d, 0.06) * eye, _soft(0.45 - iris_d, 0.03) * eye
        eye_img = torch.lerp(torch.lerp(white, p.iris, iris), torch.full_like(white, 0.04), pupil)
        img = torch.lerp(img, eye_img, eye)
        along = _soft(1.05 - dx.abs() / p.eye_rx, 0.05)
        lid_y = p.eye_y - p.eye_ry * (1 - (dx / p.eye_rx) ** 2).clamp(min=0).sqrt()
        img = img * (1 - 0.7 * torch.exp(-(((y - lid_y) / (1.5 * px + 0.006)) ** 2)) * along)
        lash = torch.exp(-(((dy - 0.2 * p.eye_ry) / (1.5 * px + 0.005)) ** 2))
        closed = closed * (1 - 0.7 * lash * along)
    return torch.stack([img, closed], dim=1).clamp(0, 1)  # B, 2, 3, n, n


def action_fields(params: Sequence[FaceParams], n: int) -> dict[str, torch.Tensor]:
    """Forward displacement field of each emotion's actions, [B, 2 (dx, dy), n, n], peak magnitude 1 per face
    (the caller scales to pixels). happiness: AU12 lip corners up and out with AU6 cheeks raised; surprise:
    AU1+2 inner and outer brows raised; disgust: AU4 brows lowered and drawn together; repression: AU15 lip
    corners down with AU17 chin raised. Each is a sum of Gaussian bumps (cy, cx, radius, vy, vx)."""
    p = _batch(params)
    y, x = coordinate_grid(n)
    inner, outer = p.eye_dx - 0.6 * p.brow_len, p.eye_dx + 0.6 * p.brow_len
    mw, my, zero = p.mouth_w, p.mouth_y, torch.zeros_like(p.mouth_y)
    bumps = {
        "happiness": [b for s in (-1, 1) for b in (
            (my - 0.01, s * mw, 0.09, -0.8, s * 0.6), (my - 0.08, s * (mw + 0.05), 0.10, -0.55, s * 0.3),
            (p.eye_y + 0.17, s * p.eye_dx, 0.10, -0.35, 0.0))],
        "surprise": [b for s in (-1, 1) for b in (
            (p.brow_y, s * inner, 0.09, -1.0, 0.0), (p.brow_y + p.brow_arch, s * outer, 0.09, -0.85, s * 0.05),
            (p.brow_y - 0.12, s * p.eye_dx, 0.14, -0.5, 0.0))],
        "disgust": [b for s in (-1, 1) for b in (
            (p.brow_y, s * inner, 0.08, 0.75, -s * 0.65), (p.brow_y, s * p.eye_dx, 0.10, 0.5, -s * 0.2))],
        "repression": [(my + 0.01, s * mw, 0.08, 1.0, s * 0.15) for s in (-1, 1)]
        + [(my + 0.17, zero, 0.10, -0.45, 0.0)],
    }
    out = {}
    for emotion, points in bumps.items():
        cy, cx, r, vy, vx = (torch.cat([torch.as_tensor(v, dtype=torch.float32).expand_as(zero) for v in col], dim=1)
                             for col in zip(*points))  # each B, P, 1, 1
        w = torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))  # B, P, n, n
        field = torch.stack([(w * vx).sum(1), (w * vy).sum(1)], dim=1)  # B, 2, n, n
        out[emotion] = field / field.norm(dim=1, keepdim=True).amax(dim=(2, 3), keepdim=True)
    return out


def warp(images: torch.Tensor, flow_px: torch.Tensor) -> torch.Tensor:
    """Move image content by a forward displacement field: images [B, C, H, W], flow_px [B, 2 (dx, dy), H, W]
    in pixels (small and smooth, so sampling at x - flow(x) is accurate). Bilinear, border-clamped."""
    b, _, h, w = images.shape
    y, x = coordinate_grid(h, w, images.device)
    base = torch.stack([x[0, 0], y[0, 0]], dim=-1).expand(b, h, w, 2)  # B, H, W, 2 (x, y) as grid_sample wants
    offset = flow_px.permute(0, 2, 3, 1) * flow_px.new_tensor([2.0 / w, 2.0 / h])
    return F.grid_sample(images, base - offset, mode="bilinear", padding_mode="border", align_corners=False)


def forward_warp(images: torch.Tensor, flow_px: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Move the content at x to x + flow(x), for motion too large for `warp`'s first-order sampling (images
    [B, C, H, W], flow_px [B, 2 (dx, dy), H, W] on the images' own grid; bilinear, border-clamped). The
    displacement t arriving at each pixel z solves t = flow(z - t): `steps` Newton steps from t = flow(z), with
    the flow's Jacobian from central differences, converge wherever the motion does not fold the image over
    itself (0 steps: `warp`). Where it folds (det(I + grad flow) < 1/4) there is no single answer and the step
    is the plain fixed-point one."""
    dy, dx = torch.gradient(flow_px, dim=(2, 3))  # each B, 2, H, W
    # B, 6, H, W: the flow and its Jacobian dfx/dx, dfx/dy, dfy/dx, dfy/dy, sampled together at the source z - t
    fields = torch.cat([flow_px, dx[:, :1], dy[:, :1], dx[:, 1:], dy[:, 1:]], dim=1)
    arriving = flow_px
    for _ in range(steps):
        (fx, fy, a, b, c, d) = warp(fields, arriving).unbind(1)  # at the source z - t, each B, H, W
        rx, ry = fx - arriving[:, 0], fy - arriving[:, 1]  # residual flow(z - t) - t
        det = (1 + a) * (1 + d) - b * c
        newton = det > 0.25
        inv = torch.where(newton, 1 / det, 1.0)
        step_x = torch.where(newton, inv * ((1 + d) * rx - b * ry), rx)  # (I + grad flow)^-1 residual
        step_y = torch.where(newton, inv * ((1 + a) * ry - c * rx), ry)
        arriving = arriving + torch.stack([step_x, step_y], dim=1)
    return warp(images, arriving)
