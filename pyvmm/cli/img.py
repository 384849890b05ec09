"""`pyvmm img`: create, inspect, convert, check, compare, map, resize,
snapshot and commit disk images, with qemu-img's option spellings.

Exit codes follow qemu-img: check gives 0 clean, 1 could not check,
2 corrupt, 3 leaks only; compare gives 0 identical, 1 different, 2 error;
everything else 0 or 1 (one line on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import VmmError
from ..storage import open_image
from ..storage.create import create_image, parse_size
from ..storage.image import ImageError
from ..storage import ops

EXIT_USAGE = 2


def _options(text_list: list[str]) -> dict[str, str]:
    """-o key=value[,key=value] (repeatable) as a dict. Raises ImageError."""
    out: dict[str, str] = {}
    for text in text_list:
        for part in filter(None, text.split(",")):
            key, sep, value = part.partition("=")
            if not sep or not key:
                raise ImageError(f"bad -o option {part!r} (expected key=value)")
            out[key.strip()] = value.strip()
    return out


def _progress_printer(enabled: bool):
    if not enabled:
        return None

    def show(percent: float) -> None:
        print(f"    ({percent:.2f}/100%)", end="\r", file=sys.stderr, flush=True)
    return show


def cmd_create(args) -> int:
    size = parse_size(args.size) if args.size is not None else None
    create_image(args.filename, args.f or "raw", size, backing=args.b, backing_fmt=args.F,
                 options=_options(args.o))
    with open_image(args.filename, args.f or "raw", readonly=True) as img:
        extra = f" backing_file={args.b}" if args.b else ""
        print(f"Formatting '{args.filename}', fmt={img.format} size={img.size}{extra}")
    return 0


def image_info(img) -> dict:
    info = {"virtual-size": img.size, "filename": img.path, "format": img.format,
            "actual-size": os.stat(img.path).st_blocks * 512, "dirty-flag": False}
    if img.format == "qcow2":
        from ..storage.qcow2_snapshot import read_snapshots
        specific = img.info()
        info["cluster-size"] = img.cluster_size
        info["dirty-flag"] = specific.pop("dirty")
        info["format-specific"] = {"type": "qcow2", "data": specific}
        snaps = read_snapshots(img)
        if snaps:
            info["snapshots"] = [s.as_json() for s in snaps]
    elif img.format == "vmdk":
        info["format-specific"] = {"type": "vmdk", "data": img.info()}
    if img.backing is not None:
        info["backing-filename"] = getattr(img, "backing_name", img.backing.path)
        info["full-backing-filename"] = img.backing.path
        info["backing-filename-format"] = img.backing.format
    return info


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return str(n)


def cmd_info(args) -> int:
    with open_image(args.filename, args.f, readonly=True) as img:
        chain = [img, *img.backing_chain()] if args.backing_chain else [img]
        infos = [image_info(i) for i in chain]
    if args.output == "json":
        print(json.dumps(infos if args.backing_chain else infos[0], indent=4))
        return 0
    for info in infos:
        print(f"image: {info['filename']}\nfile format: {info['format']}\n"
              f"virtual size: {_human_size(info['virtual-size'])} ({info['virtual-size']} bytes)\n"
              f"disk size: {_human_size(info['actual-size'])}")
        if "cluster-size" in info:
            print(f"cluster_size: {info['cluster-size']}")
        if "backing-filename" in info:
            print(f"backing file: {info['backing-filename']}\nbacking file format: {info['backing-filename-format']}")
        for snap in info.get("snapshots", []):
            print(f"snapshot: {snap['id']} {snap['name']}")
        for key, value in info.get("format-specific", {}).get("data", {}).items():
            print(f"    {key}: {value}")
    return 0


def cmd_convert(args) -> int:
    ops.convert(args.source, args.destination, src_fmt=args.f, dst_fmt=args.O or "raw", compress=args.c,
                options=_options(args.o), progress=_progress_printer(args.p))
    if args.p:
        print(file=sys.stderr)
    return 0


def cmd_check(args) -> int:
    with open_image(args.filename, args.f, readonly=not args.r) as img:
        if img.format == "qcow2":
            from ..storage.qcow2_check import check_qcow2
            result = check_qcow2(img, args.r)
        elif img.format == "vmdk":
            result = img.check()
        else:
            print(f"pyvmm: error: this image format ({img.format}) does not support checks", file=sys.stderr)
            return 63
    if args.output == "json":
        print(json.dumps(result.as_json(), indent=4))
    else:
        print(result.human())
    return result.exit_code


def cmd_compare(args) -> int:
    try:
        result = ops.compare(args.filename1, args.filename2, fmt1=args.f, fmt2=args.F, strict=args.s,
                             progress=_progress_printer(args.p))
    except VmmError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return 2
    if result.size_mismatch and not args.s:
        print("Warning: Image size mismatch!")
    if result.identical:
        print("Images are identical.")
        return 0
    print(f"Content mismatch at offset {result.offset}!")
    return 1


def cmd_map(args) -> int:
    with open_image(args.filename, args.f, readonly=True) as img:
        entries = ops.merged_map(img)
        chain = [img, *img.backing_chain()]
    if args.output == "json":
        print(json.dumps([e.as_json() for e in entries], indent=1))
        return 0
    print(f"{'Offset':<20}{'Length':<20}{'Mapped to':<20}File")
    for e in entries:
        if e.data and e.offset is not None:
            print(f"0x{e.start:<18x}0x{e.length:<18x}0x{e.offset:<18x}{chain[e.depth].path}")
    return 0


def cmd_resize(args) -> int:
    text = args.size
    with open_image(args.filename, args.f) as img:
        if text[:1] in "+-":
            delta = parse_size(text[1:])
            size = img.size + delta if text[0] == "+" else img.size - delta
        else:
            size = parse_size(text)
        if size < 0:
            raise ImageError(f"new size {size} is negative")
        if size < img.size and not args.shrink:
            raise ImageError("shrinking needs --shrink (data past the new end is lost)")
        if not hasattr(img, "resize"):
            raise ImageError(f"{img.format} images cannot be resized")
        img.resize(size)
    print("Image resized.")
    return 0


def cmd_snapshot(args) -> int:
    from ..storage import qcow2_snapshot as snap
    actions = [a for a in (args.l and "l", args.c, args.a, args.d) if a]
    if len(actions) != 1:
        raise ImageError("snapshot: give exactly one of -l, -c NAME, -a NAME, -d NAME")
    with open_image(args.filename, args.f, readonly=bool(args.l)) as img:
        if img.format != "qcow2":
            raise ImageError(f"{img.format} images have no internal snapshots")
        if args.l:
            print("Snapshot list:\nID        TAG                 VM SIZE                DATE     VM CLOCK")
            for s in snap.list_snapshots(img):
                import time
                date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.date_sec))
                print(f"{s.id:<10}{s.name:<20}{s.vm_state_size:>7} B {date} 00:00:00.000")
        elif args.c:
            snap.create_snapshot(img, args.c)
        elif args.a:
            snap.apply_snapshot(img, args.a)
        else:
            snap.delete_snapshot(img, args.d)
    return 0


def cmd_commit(args) -> int:
    base = ops.commit(args.filename, fmt=args.f, keep=args.d, progress=_progress_printer(args.p))
    if args.p:
        print(file=sys.stderr)
    print(f"Image committed into {base}.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvmm img", description="Disk image tool (qemu-img's spellings).")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt_help = "image format: raw, qcow2, vmdk (default: probed)"

    p = sub.add_parser("create", help="create an empty image")
    p.add_argument("-f", help="format (default raw)")
    p.add_argument("-b", metavar="BACKING", help="backing file (relative names are relative to the new image)")
    p.add_argument("-F", metavar="BACKING_FMT", help="backing file format")
    p.add_argument("-o", action="append", default=[], help="cluster_size=64K, refcount_bits=16, subformat=...")
    p.add_argument("-u", action="store_true", help="accepted for qemu-img compatibility")
    p.add_argument("-q", action="store_true", help="quiet")
    p.add_argument("filename")
    p.add_argument("size", nargs="?")
    p.set_defaults(handler=cmd_create)

    p = sub.add_parser("info", help="describe an image")
    p.add_argument("-f", help=fmt_help)
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("--backing-chain", action="store_true")
    p.add_argument("-U", "--force-share", action="store_true", help="accepted for qemu-img compatibility")
    p.add_argument("filename")
    p.set_defaults(handler=cmd_info)

    p = sub.add_parser("convert", help="copy an image into a new one, maybe of another format")
    p.add_argument("-f", help=fmt_help)
    p.add_argument("-O", help="output format (default raw)")
    p.add_argument("-c", action="store_true", help="compress (qcow2; vmdk streamOptimized)")
    p.add_argument("-o", action="append", default=[], help="options of the new image")
    p.add_argument("-p", action="store_true", help="show progress")
    p.add_argument("source")
    p.add_argument("destination")
    p.set_defaults(handler=cmd_convert)

    p = sub.add_parser("check", help="check (and repair) an image's metadata")
    p.add_argument("-f", help=fmt_help)
    p.add_argument("-r", choices=["leaks", "all"], help="repair leaks, or everything")
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("filename")
    p.set_defaults(handler=cmd_check)

    p = sub.add_parser("compare", help="compare the guest contents of two images")
    p.add_argument("-f", help="first image's format")
    p.add_argument("-F", help="second image's format")
    p.add_argument("-s", action="store_true", help="strict: a size difference is a mismatch")
    p.add_argument("-p", action="store_true", help="show progress")
    p.add_argument("filename1")
    p.add_argument("filename2")
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser("map", help="show where each guest range is stored")
    p.add_argument("-f", help=fmt_help)
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("filename")
    p.set_defaults(handler=cmd_map)

    p = sub.add_parser("resize", help="change an image's virtual size")
    p.add_argument("-f", help=fmt_help)
    p.add_argument("--shrink", action="store_true", help="allow shrinking (raw only)")
    p.add_argument("filename")
    p.add_argument("size", help="new size, or +SIZE / -SIZE")
    p.set_defaults(handler=cmd_resize)

    p = sub.add_parser("snapshot", help="list, create, apply or delete internal qcow2 snapshots")
    p.add_argument("-f", help=fmt_help)
    p.add_argument("-l", action="store_true", help="list snapshots")
    p.add_argument("-c", metavar="NAME", help="create a snapshot")
    p.add_argument("-a", metavar="NAME", help="apply (revert to) a snapshot")
    p.add_argument("-d", metavar="NAME", help="delete a snapshot")
    p.add_argument("filename")
    p.set_defaults(handler=cmd_snapshot)

    p = sub.add_parser("commit", help="write an overlay's changes into its backing file")
    p.add_argument("-f", help=fmt_help)
    p.add_argument("-p", action="store_true", help="show progress")
    p.add_argument("-d", action="store_true", help="keep the overlay's data (do not empty it)")
    p.add_argument("filename")
    p.set_defaults(handler=cmd_commit)
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else 0
    try:
        return args.handler(args)
    except VmmError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"pyvmm: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
