"""Alert packets: one Avro alert per diaSource, in Rubin's alert schema (``lsst-alert-packet``).

Each alert holds the diaSource, its diaObject as just recomputed, the object's earlier
diaSources and forced sources (``prvDiaSources``, ``prvDiaForcedSources``), and cutouts of
the science, template and difference images around it (FITS bytes: IMAGE, MASK and
VARIANCE planes with the cutout's WCS), so brokers' tools read them as they read Rubin's.
Records are filled from APDB rows by the schema's own field list: a nullable field missing
or NaN is null; a required one missing is an error naming it.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from astropy.io import fits

from .errors import GpuDiffimError
from .io import atomic_path

__all__ = ["CUTOUT_SIZE", "AlertError", "alert_schema", "cutout_fits", "alert_packets",
           "write_alerts", "read_alert"]

#: side of the cutouts (pixels)
CUTOUT_SIZE = 31


class AlertError(GpuDiffimError):
    """An alert cannot be made or written; the message says which field or file."""


def alert_schema():
    """Rubin's latest alert schema (``lsst.alert.packet.Schema``)."""
    try:
        from lsst.alert.packet import Schema
    except ImportError as exc:
        raise AlertError("alert packets need Rubin's lsst-alert-packet "
                         "(pip install 'gpudiffim[apdb]')") from exc
    return Schema.from_file()


def cutout_fits(exposure, x: float, y: float, size: int = CUTOUT_SIZE) -> bytes:
    """A ``size`` x ``size`` cutout of ``exposure`` centred on pixel (x, y) as FITS bytes
    (IMAGE with the cutout's WCS, MASK, VARIANCE); beyond the image: NaN, NO_DATA, 0."""
    ny, nx = exposure.shape
    half = size // 2
    cx, cy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
    planes = {"IMAGE": np.full((size, size), np.nan, np.float32),
              "MASK": np.full((size, size), exposure.bit("NO_DATA"), np.int32),
              "VARIANCE": np.zeros((size, size), np.float32)}
    y0, x0 = cy - half, cx - half
    ya, yb, xa, xb = max(y0, 0), min(y0 + size, ny), max(x0, 0), min(x0 + size, nx)
    if ya < yb and xa < xb:
        for name, plane in (("IMAGE", exposure.image), ("MASK", exposure.mask),
                            ("VARIANCE", exposure.variance)):
            planes[name][ya - y0:yb - y0, xa - x0:xb - x0] = np.asarray(plane[ya:yb, xa:xb])
    header = fits.Header()
    if exposure.wcs is not None:  # the parent's WCS, its reference pixel moved
        header = exposure.wcs.to_header(relax=True)
        header["CRPIX1"] = header.get("CRPIX1", 0.0) - x0
        header["CRPIX2"] = header.get("CRPIX2", 0.0) - y0
    header["LTV1"], header["LTV2"] = -x0, -y0  # afw's offset to the parent image
    hdus = fits.HDUList([fits.PrimaryHDU(),
                         fits.ImageHDU(planes["IMAGE"], header=header, name="IMAGE"),
                         fits.ImageHDU(planes["MASK"], name="MASK"),
                         fits.ImageHDU(planes["VARIANCE"], name="VARIANCE")])
    buffer = io.BytesIO()
    hdus.writeto(buffer)
    return buffer.getvalue()


def _record_fields(schema, field: str) -> list:
    """The field list of the record type of alert field ``field`` (a record, or an array
    of records, maybe nullable)."""
    spec = next(f for f in schema.definition["fields"] if f["name"] == field)["type"]
    for option in (spec if isinstance(spec, list) else [spec]):
        if isinstance(option, dict):
            return (option["items"] if option.get("type") == "array" else option)["fields"]
    raise AlertError(f"alert field {field} is not a record")


def _missing(value) -> bool:
    """NaN, or pandas' NA (a nullable integer column's NULL), whose comparisons raise."""
    try:
        return bool(value != value)
    except (TypeError, ValueError):
        return True


def _value(kind, value):
    """A Python value of the Avro type ``kind`` (a name or a [null, name] union)."""
    base = [k for k in (kind if isinstance(kind, list) else [kind]) if k != "null"][0]
    if value is None or (base in ("long", "int", "float", "double") and _missing(value)):
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if base in ("long", "int"):
        return int(value)
    if base in ("float", "double"):
        return float(value)
    if base == "boolean":
        return bool(value)
    if base == "string":
        return str(value)
    return value


def _record(fields: list, row: dict, what: str) -> dict:
    out = {}
    for field in fields:
        name, kind = field["name"], field["type"]
        nullable = isinstance(kind, list) and "null" in kind
        value = _value(kind, row.get(name))
        if value is None and not nullable:
            raise AlertError(f"{what} has no value for the required field {name}")
        out[name] = value
    return out


def _rows(frame) -> list[dict]:
    return [] if frame is None or not len(frame) else frame.to_dict("records")


def alert_packets(schema, sources, objects, prv_sources, prv_forced, difference, science,
                  template) -> list[dict]:
    """One alert record per row of ``sources`` (APDB DiaSource rows with diaObjectId),
    with its diaObject from ``objects``, its object's earlier sources and forced sources
    from ``prv_sources`` and ``prv_forced``, and cutouts of the three images (any of them
    may be None: no cutout)."""
    f_source = _record_fields(schema, "diaSource")
    f_object = _record_fields(schema, "diaObject")
    f_forced = _record_fields(schema, "prvDiaForcedSources")
    by_object = {int(r["diaObjectId"]): r for r in _rows(objects)}
    earlier: dict = {}
    for r in _rows(prv_sources):
        earlier.setdefault(int(r["diaObjectId"]), []).append(r)
    forced: dict = {}
    for r in _rows(prv_forced):
        forced.setdefault(int(r["diaObjectId"]), []).append(r)
    packets = []
    for row in _rows(sources):
        object_id = int(row.get("diaObjectId") or 0)
        what = f"diaSource {row['diaSourceId']}"
        before = [r for r in earlier.get(object_id, []) if r["diaSourceId"] != row["diaSourceId"]]
        packets.append({
            "diaSourceId": int(row["diaSourceId"]),
            "observation_reason": None, "target_name": None,
            "diaSource": _record(f_source, row, what),
            "prvDiaSources": [_record(f_source, r, f"{what}'s earlier source") for r in before],
            "prvDiaForcedSources": [_record(f_forced, r, f"{what}'s forced source")
                                    for r in forced.get(object_id, [])],
            "diaObject": (_record(f_object, by_object[object_id], f"{what}'s object")
                          if object_id in by_object else None),
            "ssSource": None, "mpc_orbits": None,
            **{f"cutout{name}": (cutout_fits(image, row["x"], row["y"])
                                 if image is not None else None)
               for name, image in (("Difference", difference), ("Science", science),
                                   ("Template", template))}})
    return packets


def write_alerts(schema, packets, directory) -> list[Path]:
    """Each packet as its own Avro file ``directory/<diaSourceId>.avro`` (with the schema,
    readable by any Avro reader), written atomically; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for packet in packets:
        path = directory / f"{packet['diaSourceId']}.avro"
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            try:
                schema.store_alerts(handle, [packet])
            except Exception as exc:  # fastavro names the field it could not write
                raise AlertError(f"{path}: not a valid alert ({type(exc).__name__}: "
                                 f"{exc})") from exc
        paths.append(path)
    return paths


def read_alert(path, schema=None) -> dict:
    """The alert in an Avro file written by :func:`write_alerts`."""
    schema = schema or alert_schema()
    with open(path, "rb") as handle:
        records = list(schema.retrieve_alerts(handle)[1])
    if len(records) != 1:
        raise AlertError(f"{path}: {len(records)} alerts, not one")
    return records[0]
