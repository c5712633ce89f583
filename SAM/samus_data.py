"""SAMUS-layout segmentation data for the A-SAM stages.

Layout::

    <root>/<Dataset>/img/<name>.png     gray or RGB, any size
    <root>/<Dataset>/label/<name>.png   0/255 binary or index map, same size
    <root>/MainPatient/{train,val,test}.txt   lines "<class ID>/<Dataset>/<name>"
    <root>/MainPatient/class.json       {"<Dataset>": classes incl. background}

One sample = one split line = one (image, anatomy) pair; its target is ``label == class ID``.
The prompt key of a sample is "<Dataset>/<class ID>" (index into the auto-prompter's tokens).

A **negative set** is a data set that class.json gives 1 class (the background alone): images
that show none of the anatomies, e.g. lung frames beside fetal-head and nerve scans. Its lines
read ``0/<Dataset>/<name>`` and it needs no label files. Its images only ever serve as
negatives (:func:`negative_lines`): shown with the prompts of the data sets they lack, whose
targets are empty. Which those are: every other data set, or the list that the optional
``MainPatient/absent.json`` gives, ``{"<image set>": ["<data set whose anatomy it lacks>", ...]}``
(lung frames lack fetal heads, but not the synthetic lung scans' pleura).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from utils.io import DataError, atomic_write, read_image, read_label


#: the class ID of a negative set's lines (the background: none of the anatomies is shown)
NEGATIVE_SET_ID = 0


@dataclass(frozen=True)
class SplitLine:
    """One (image, anatomy) sample. ``prompt`` set = a negative: the image (of ``dataset``)
    is shown with another data set's anatomy prompt, whose target is empty."""
    class_id: int
    dataset: str
    name: str
    prompt: str | None = None

    @property
    def prompt_key(self) -> str:
        return self.prompt or f"{self.dataset}/{self.class_id}"

    @property
    def negative(self) -> bool:
        return self.prompt is not None

    @property
    def image_key(self) -> str:
        return f"{self.dataset}/{self.name}"

    @property
    def from_negative_set(self) -> bool:
        """A negative set's own line (not yet paired with a prompt)."""
        return self.class_id == NEGATIVE_SET_ID and self.prompt is None

    @property
    def empty_target(self) -> bool:
        """A negative, or a negative set's line: the target is empty whatever the label holds."""
        return self.class_id == NEGATIVE_SET_ID


def read_class_json(root: str | Path) -> dict[str, int]:
    path = Path(root) / "MainPatient" / "class.json"
    if not path.is_file():
        raise DataError(f"{path}: class.json not found (is {root} a SAMUS-layout root?)")
    try:
        return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
    except (ValueError, AttributeError) as e:
        raise DataError(f"{path}: not a JSON object of dataset -> class count ({e})") from None


def read_split(root: str | Path, split: str, datasets: tuple[str, ...] = (),
               negative_sets: bool = False) -> list[SplitLine]:
    """Parse ``MainPatient/<split>.txt``; keep only ``datasets`` when given, and the lines of
    negative sets (class ID 0) only with ``negative_sets``, then every negative set's (they
    hold no prompt of their own: which prompts they meet is absent.json's business)."""
    path = Path(root) / "MainPatient" / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    classes = read_class_json(root)
    lines = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        raw = raw.strip()
        if not raw:
            continue
        parts = raw.split("/")
        if len(parts) != 3 or not parts[0].isdigit():
            raise DataError(f"{path}:{n}: expected '<class ID>/<Dataset>/<name>', got '{raw}'")
        line = SplitLine(int(parts[0]), parts[1], parts[2])
        if datasets and line.dataset not in datasets and not (negative_sets and classes.get(line.dataset) == 1):
            continue
        if line.dataset not in classes:
            raise DataError(f"{path}:{n}: dataset '{line.dataset}' is missing from class.json")
        if classes[line.dataset] == 1:  # a negative set: no anatomy to prompt for
            if not line.from_negative_set:
                raise DataError(f"{path}:{n}: dataset '{line.dataset}' has 1 class in class.json (a negative "
                                f"set, no anatomy): its lines read '0/{line.dataset}/<name>', got '{raw}'")
            if negative_sets:
                lines.append(line)
            continue
        if not 1 <= line.class_id < classes[line.dataset]:
            raise DataError(f"{path}:{n}: class ID {line.class_id} outside 1..{classes[line.dataset] - 1}")
        lines.append(line)
    if not lines:
        raise DataError(f"{path}: no lines for datasets {datasets or 'any'}")
    return lines


def prompt_keys(root: str | Path, datasets: tuple[str, ...] = ()) -> list[str]:
    """Every "<Dataset>/<class ID>" of the chosen datasets, sorted: the prompter's vocabulary."""
    classes = read_class_json(root)
    missing = [d for d in datasets if d not in classes]
    if missing:
        raise DataError(f"{root}: datasets {missing} not in class.json ({sorted(classes)})")
    return [f"{d}/{c}" for d in sorted(datasets or classes) for c in range(1, classes[d])]


def add_negative_set(root: str | Path, name: str, images: dict[str, list[Path]],
                     lacks: list[str] | None = None) -> None:
    """Make ``name`` a negative set of the SAMUS-layout ``root`` (whose MainPatient files this
    rewrites, atomically, class.json first): each image of ``images[split]`` linked as
    ``<root>/<name>/img/<file name>`` with a line ``0/<name>/<stem>`` in that split (the set's
    earlier lines are replaced, other sets' kept), ``{name: 1}`` in class.json, and ``lacks`` (the
    data sets whose anatomies the images do not show; None: every other one) in absent.json.
    Two images of one name, in one split or two, are refused. Running it again with the same
    images changes nothing."""
    root = Path(root)
    main = root / "MainPatient"
    classes = read_class_json(root)
    if classes.get(name, 1) != 1:
        raise DataError(f"{main / 'class.json'}: '{name}' is a data set with anatomies, not a negative set")
    if lacks is not None and not lacks:
        raise DataError(f"negative set '{name}': lacks=[] would show its images with no prompt at all")
    unknown = sorted(set(lacks or ()) - set(classes))
    if unknown:
        raise DataError(f"{main / 'class.json'}: data sets {unknown} (what '{name}' lacks) are not in it")
    seen: dict[str, Path] = {}
    for path in (Path(p) for paths in images.values() for p in paths):
        if path.suffix.lower() != ".png":
            raise DataError(f"{path}: a negative set's images must be PNG files")
        if path.stem in seen and seen[path.stem].resolve() != path.resolve():
            raise DataError(f"negative set '{name}': {seen[path.stem]} and {path} have one name")
        if path.stem in seen:
            raise DataError(f"negative set '{name}': {path} is listed twice (in one split or two)")
        seen[path.stem] = path
    absent_file = main / "absent.json"
    try:
        absent = json.loads(absent_file.read_text()) if absent_file.is_file() else {}
        if not isinstance(absent, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise DataError(f"{absent_file}: not a JSON object of data set -> list of data sets ({e})") from None
    classes[name] = 1
    atomic_write(main / "class.json", lambda f: f.write((json.dumps(classes, indent=4) + "\n").encode()))
    folder = root / name / "img"
    folder.mkdir(parents=True, exist_ok=True)
    for path in seen.values():
        link = folder / path.name
        if link.is_symlink() and link.resolve() != path.resolve():
            link.unlink()                        # the same name, another frame: the set was re-picked
        elif link.exists() and not link.is_symlink():
            raise DataError(f"{link}: a file is there, not a link this function made")
        if not link.is_symlink():
            link.symlink_to(path.resolve())
    for split in sorted({*images, *(p.stem for p in main.glob("*.txt"))}):
        split_file = main / f"{split}.txt"
        old = split_file.read_text().splitlines() if split_file.is_file() else []
        keep = [l for l in old if l.split("/")[1:2] != [name]]
        lines = keep + [f"{NEGATIVE_SET_ID}/{name}/{Path(p).stem}" for p in images.get(split, [])]
        if lines != old:
            atomic_write(split_file, lambda f, t="".join(l + "\n" for l in lines).encode(): f.write(t))
    if lacks is None:
        absent.pop(name, None)
    else:
        absent[name] = sorted(lacks)
    if absent:
        atomic_write(absent_file, lambda f: f.write((json.dumps(absent, indent=1) + "\n").encode()))
    elif absent_file.is_file():
        absent_file.unlink()


# --------------------------------------------------------------------------- #
# augmentation (numpy, no I/O: unit-testable)
# --------------------------------------------------------------------------- #
def augment_pair(img: np.ndarray, lab: np.ndarray, rng: np.random.Generator,
                 p: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """METHOD.md §1: rotation ±30°, scale 1–1.3, contrast, gamma, each with probability p.

    img: HxWx3 uint8, lab: HxW int -> same shapes; geometry is shared, intensity is image-only.
    """
    h, w = lab.shape
    angle = rng.uniform(-30, 30) if rng.random() < p else 0.0
    scale = rng.uniform(1.0, 1.3) if rng.random() < p else 1.0
    if angle or scale != 1.0:
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
        img = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
        lab = cv2.warpAffine(lab.astype(np.uint8), m, (w, h), flags=cv2.INTER_NEAREST,
                             borderValue=0).astype(lab.dtype)
    f = img.astype(np.float32)
    if rng.random() < p:  # contrast about the mean
        f = (f - f.mean()) * rng.uniform(0.7, 1.3) + f.mean()
    if rng.random() < p:  # gamma
        f = 255.0 * (np.clip(f, 0, 255) / 255.0) ** rng.uniform(0.7, 1.5)
    return np.clip(f, 0, 255).astype(np.uint8), lab


def central_point(mask: np.ndarray) -> tuple[float, float]:
    """The foreground pixel farthest from the boundary, as (x, y): 'central' even for rings."""
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x), float(y)


def random_point(mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    i = int(rng.integers(len(ys)))
    return float(xs[i]), float(ys[i])


def letterbox(img: np.ndarray, size: int, nearest: bool = False) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize so the longest side is ``size`` (aspect kept), pad bottom/right with zeros.

    HxW[xC] -> size x size[xC] and the valid (h, w) of the resized content. LiteMedSAM was
    trained this way, and anatomy keeps its shape (a stretched fetal head is another ellipse).
    """
    h, w = img.shape[:2]
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)
    out = np.zeros((size, size) + img.shape[2:], img.dtype)
    out[:nh, :nw] = small
    return out, (nh, nw)


def restore_logits(logits: torch.Tensor, valid: tuple[int, int], img_size: int,
                   size: tuple[int, int]) -> torch.Tensor:
    """Low-res logits (C, L, L) of a letterboxed input -> (C, H, W) at the image's own size:
    crop the valid part, then resize bilinearly."""
    L = logits.shape[-1]
    vh, vw = max(1, round(valid[0] * L / img_size)), max(1, round(valid[1] * L / img_size))
    crop = logits[None, :, :vh, :vw].float()
    return torch.nn.functional.interpolate(crop, size=tuple(size), mode="bilinear", align_corners=False)[0]


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight xyxy box of the foreground (float32, 4); zeros for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return np.zeros(4, dtype=np.float32)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def image_to_tensor(img: np.ndarray, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """HxWx3 uint8 -> ((3, size, size) float in [0, 1] letterboxed, valid (h, w))."""
    boxed, valid = letterbox(img, size)
    return torch.from_numpy(boxed).permute(2, 0, 1).float().div_(255.0), valid


def subset_lines(lines: list[SplitLine], n: int, seed: int = 0) -> list[SplitLine]:
    """At most ``n`` lines per dataset, drawn evenly at random (seeded) across the whole split
    and kept in file order: a class-sorted split file still gives every class its share
    (the first N lines of such a file would be one class)."""
    rng = np.random.default_rng(seed)
    keep: set[int] = set()
    # negative sets last: adding one leaves the anatomy sets' draws as they were
    for _, dataset in sorted({(line.from_negative_set, line.dataset) for line in lines}):
        idx = [i for i, line in enumerate(lines) if line.dataset == dataset]
        keep.update(idx if len(idx) <= n else rng.choice(idx, n, replace=False).tolist())
    return [line for i, line in enumerate(lines) if i in keep]


def read_absent_for(root: str | Path) -> dict[str, set[str]]:
    """``MainPatient/absent.json`` (optional): {image set: the data sets whose anatomies its
    images lack}; {} when the file is not there (every image set lacks every other set's). It may
    name an anatomy set too, which then changes that set's own negatives."""
    path = Path(root) / "MainPatient" / "absent.json"
    if not path.is_file():
        return {}
    classes = read_class_json(root)
    try:
        raw = json.loads(path.read_text())
        out = {str(k): {str(d) for d in v} for k, v in raw.items() if isinstance(v, list)}
    except (ValueError, AttributeError) as e:
        raise DataError(f"{path}: not a JSON object of data set -> list of data sets ({e})") from None
    if len(out) != len(raw):
        raise DataError(f"{path}: every value must be a list of data set names")
    unknown = sorted(({*out} | {d for v in out.values() for d in v}) - set(classes))
    if unknown:
        raise DataError(f"{path}: data sets {unknown} are not in class.json ({sorted(classes)})")
    return out


def negative_lines(lines: list[SplitLine], keys: list[str], rate: float, seed: int = 0,
                   absent_for: dict[str, set[str]] | None = None) -> list[SplitLine]:
    """Negatives for prompt-free training: each image paired with prompts of the *other*
    data sets (whose anatomy it does not carry; with ``absent_for``, of the data sets listed
    for its own, :func:`read_absent_for`), as many as ``rate`` x the lines given
    (``rate`` >= 1 or a short supply: every such pair), drawn seeded.

    The lines of negative sets (class ID 0) are drawn apart and after the others: the anatomy
    lines give ``rate`` x their count from their own images' pairs (the same draw as without a
    negative set), the negative sets ``rate`` x theirs from theirs.

    Returns the extra lines (targets empty), in a stable order.
    """
    absent_for = absent_for or {}
    rng = np.random.default_rng(seed)
    out = []
    for group in ([l for l in lines if not l.from_negative_set], [l for l in lines if l.from_negative_set]):
        images = sorted({(l.dataset, l.name) for l in group})
        pairs = [(d, n, k) for d, n in images for k in keys
                 if k.split("/")[0] != d and k.split("/")[0] in absent_for.get(d, {k.split("/")[0]})]
        want = min(len(pairs), round(rate * len(group)))
        if want > 0:
            chosen = sorted(rng.choice(len(pairs), want, replace=False).tolist())
            out += [SplitLine(0, pairs[i][0], pairs[i][1], prompt=pairs[i][2]) for i in chosen]
    return out


def check_files(root: Path, lines: list[SplitLine], split_file: str, skip_missing: bool = False
                ) -> list[SplitLine]:
    """Every image and label a split names must exist, checked before any work.

    Returns ``lines`` (without those whose files are missing when ``skip_missing``, with a
    note of how many); otherwise a DataError lists the missing files by name.
    """
    missing, keep = [], []
    for line in lines:
        paths = [root / line.dataset / "img" / f"{line.name}.png"]
        if not line.empty_target:  # a negative set's image needs no label: it shows no anatomy
            paths.append(root / line.dataset / "label" / f"{line.name}.png")
        absent = [str(p) for p in paths if not p.is_file()]
        missing += absent
        if not absent:
            keep.append(line)
    if not missing:
        return lines
    missing = sorted(set(missing))
    if not skip_missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DataError(f"{split_file}: {len(missing)} file(s) named in the split do not exist: {shown} "
                        "(fix the split, or pass --skip_missing true to leave those lines out)")
    print(f"note: {split_file}: left out {len(lines) - len(keep)} line(s) whose image or label is missing "
          f"({len(missing)} file(s))")
    return keep


class SAMUSDataset(Dataset):
    """Split lines -> dicts of tensors at ``img_size`` (S) and ``low_res`` (L):

    image (3, S, S) float in [0, 1], letterboxed (:func:`letterbox`), valid (2,) its content
    height and width; mask (S, S) and low_mask (L, L) float {0, 1};
    point (1, 2) xy and point_label (1,) (random click if ``augment`` else the central point);
    box (4,) xyxy; prompt_idx (); with ``return_orig`` also orig_mask (H, W) uint8 at the
    image's own size (collate with :func:`collate`).
    """

    def __init__(self, root: str | Path, split: str, img_size: int, low_res: int,
                 keys: list[str], datasets: tuple[str, ...] = (), augment: bool = False,
                 return_orig: bool = False, max_items: int = 0, subset_seed: int = 0,
                 skip_missing: bool = False, negative_rate: float = 0.0):
        self.root = Path(root)
        self.lines = read_split(root, split, datasets, negative_sets=negative_rate > 0)
        if max_items > 0:
            self.lines = subset_lines(self.lines, max_items, subset_seed)
        self.lines = check_files(self.root, self.lines, f"{root}/MainPatient/{split}.txt", skip_missing)
        if negative_rate > 0:  # a negative set's own lines leave: its images come back as negatives
            negatives = negative_lines(self.lines, keys, negative_rate, subset_seed, read_absent_for(root))
            self.lines = [l for l in self.lines if not l.from_negative_set] + negatives
        self.img_size, self.low_res = img_size, low_res
        self.key_index = {k: i for i, k in enumerate(keys)}
        unknown = {l.prompt_key for l in self.lines} - set(self.key_index)
        if unknown:
            raise DataError(f"{root}/{split}: prompt keys {sorted(unknown)} not known to the model "
                            f"({keys})")
        self.augment, self.return_orig = augment, return_orig

    def __len__(self) -> int:
        return len(self.lines)

    def load_pair(self, line: SplitLine) -> tuple[np.ndarray, np.ndarray]:
        img = read_image(self.root / line.dataset / "img" / f"{line.name}.png", "rgb")
        if line.empty_target:  # no anatomy to mark: no label is read (a negative set has none)
            return img, np.zeros(img.shape[:2], np.int64)
        lab_path = self.root / line.dataset / "label" / f"{line.name}.png"
        lab = read_label(lab_path)
        if lab.shape != img.shape[:2]:
            raise DataError(f"{lab_path}: label {lab.shape} and image {img.shape[:2]} differ in size")
        return img, lab

    def image_tensor(self, img: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 -> (3, S, S) float in [0, 1], letterboxed."""
        return image_to_tensor(img, self.img_size)[0]

    def __getitem__(self, i: int) -> dict:
        line = self.lines[i]
        img, lab = self.load_pair(line)
        # an empty target is a legitimate answer: "no such anatomy here" (a negative line,
        # or a split line whose anatomy is absent from this image)
        orig = np.zeros_like(lab, np.uint8) if line.empty_target else (lab == line.class_id).astype(np.uint8)
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,))))
        mask = orig
        if self.augment:
            a_img, a_lab = augment_pair(img, lab, rng)
            a_mask = np.zeros_like(a_lab, np.uint8) if line.empty_target else (a_lab == line.class_id).astype(np.uint8)
            if a_mask.sum() >= 4 or not orig.any():  # the zoom can push a small anatomy out of view: keep original then
                img, mask = a_img, a_mask
        S, L = self.img_size, self.low_res
        m_s, valid = letterbox(mask, S, nearest=True)
        if not m_s.any() and mask.any():  # a sliver lost in resizing: keep its nearest pixel
            ys, xs = np.nonzero(mask)
            m_s[int(ys[0] * valid[0] / mask.shape[0]), int(xs[0] * valid[1] / mask.shape[1])] = 1
        if m_s.any():
            pt, pt_label = random_point(m_s, rng) if self.augment else central_point(m_s), 1
        else:  # nothing to click: SAM's padding point (label -1) carries no prompt
            pt, pt_label = (0.0, 0.0), -1
        item = {
            "image": self.image_tensor(img),
            "mask": torch.from_numpy(m_s).float(),
            "low_mask": torch.from_numpy(cv2.resize(m_s, (L, L), interpolation=cv2.INTER_NEAREST)).float(),
            "point": torch.tensor([pt], dtype=torch.float32),
            "point_label": torch.tensor([pt_label], dtype=torch.int64),
            "box": torch.from_numpy(mask_box(m_s)),
            "prompt_idx": torch.tensor(self.key_index[line.prompt_key]),
            "index": torch.tensor(i),
            "valid": torch.tensor(valid),
        }
        if self.return_orig:
            item["orig_mask"] = orig
        return item


def collate(items: list[dict]) -> dict:
    """Stack tensors; keep variable-size numpy arrays (orig_mask) as lists."""
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out

