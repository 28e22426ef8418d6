"""The node's YAML configuration (``medsight node run --config node.yaml``)::

    ae_title: MEDSIGHT                 # this node's AE title
    listen: {host: 127.0.0.1, port: 11112}   # the Storage SCP (omit: no SCP)
    #   tls: {cert: node.pem, key: node.key, ca: clients-ca.pem}   # optional DIMSE TLS (ca: client certs required)
    allowed_calling_aets: [ORTHANC]    # the only AE titles allowed to associate
    workdir: /var/lib/medsight-node    # worklist.sqlite + store/ (0700)
    store_quota_mb: 2048               # bound on received files held at once
    max_instance_mb: 512               # one received instance (and one association's PDUs) at most
    stable_age_s: 10                   # a series is complete after this long without a new instance
    lease_s: 300                       # a running job older than this is redone (node killed)
    retry: {max_attempts: 8, backoff_s: 2, backoff_max_s: 300}
    pacs:
      dicomweb: {url: "https://pacs.example/dicom-web", username: medsight,
                 password_env: MEDSIGHT_PACS_PASSWORD,   # or password_file: /run/secrets/pacs
                 verify_tls: true, ca_bundle: null}
      dimse: {host: pacs.example, port: 104, ae_title: PACS}   # + tls: {ca: pacs-ca.pem, cert:, key:} (optional)
    retrieve: dicomweb                 # dicomweb (WADO-RS) | dimse (C-MOVE to this node's SCP)
    send: dicomweb                     # dicomweb (STOW-RS) | dimse (C-STORE)
    poll: {interval_s: 30, query: dicomweb, filters: {Modality: CR}}   # omit: no polling
    routes:                            # every matching route makes one job per series
      - name: chest
        bundle: runs/chest
        match: {modality: [CR, DX], body_part: [CHEST], series_description: "(?i)pa|ap",
                sop_class: ["1.2.840.10008.5.1.4.1.1.1"]}
    metrics: {host: 127.0.0.1, port: 9108}   # Prometheus text at /metrics (omit: none)

Passwords come from the environment or a file, never from the YAML itself, and never appear in a repr.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from medsight.errors import ConfigError

_AE = re.compile(r"^[\x20-\x7e]{1,16}$")


@dataclass
class Route:
    name: str
    bundle: Path
    modality: list[str] = field(default_factory=list)
    body_part: list[str] = field(default_factory=list)
    series_description: str | None = None
    sop_class: list[str] = field(default_factory=list)

    def may_match(self, row: dict) -> bool:
        """Before retrieval, from a query result (``modality`` / ``description``, None when not returned):
        False only when a returned attribute rules this route out."""
        if self.modality and row.get("modality") is not None and \
                str(row["modality"]).upper() not in {m.upper() for m in self.modality}:
            return False
        return not (self.series_description and row.get("description") is not None
                    and not re.search(self.series_description, str(row["description"])))

    def matches(self, attrs: dict) -> bool:
        """``attrs``: Modality, BodyPartExamined, SeriesDescription, SOPClassUID of an instance. An empty
        criterion matches everything."""
        def upper(v):
            return str(v or "").strip().upper()

        if self.modality and upper(attrs.get("Modality")) not in {m.upper() for m in self.modality}:
            return False
        if self.body_part and upper(attrs.get("BodyPartExamined")) not in {b.upper() for b in self.body_part}:
            return False
        if self.series_description and not re.search(self.series_description, str(attrs.get("SeriesDescription") or "")):
            return False
        return not (self.sop_class and str(attrs.get("SOPClassUID") or "") not in self.sop_class)


@dataclass
class DicomWeb:
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    verify_tls: bool = True
    ca_bundle: str | None = None


@dataclass
class Tls:
    """DIMSE TLS: ``cert`` / ``key`` (PEM) identify this side; ``ca`` verifies the peer (for the SCP: client
    certificates are then required)."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    def server_context(self):
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        if self.ca:
            ctx.load_verify_locations(self.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self):
        import ssl

        ctx = ssl.create_default_context(cafile=self.ca) if self.ca else ssl.create_default_context()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx


def _tls(d, where: str, base: Path, server: bool) -> Tls | None:
    if not d:
        return None
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping with cert, key, ca")
    t = Tls(**{k: None if d.get(k) is None else str(d[k] if Path(str(d[k])).is_absolute() else base / str(d[k]))
               for k in ("cert", "key", "ca")})
    if server and not (t.cert and t.key):
        raise ConfigError(f"{where}: a TLS server needs cert and key")
    for k in ("cert", "key", "ca"):
        v = getattr(t, k)
        if v is not None and not Path(v).is_file():
            raise ConfigError(f"{where}.{k}: file {v} not found")
    return t


@dataclass
class Dimse:
    host: str
    port: int
    ae_title: str
    tls: Tls | None = None


@dataclass
class NodeConfig:
    ae_title: str = "MEDSIGHT"
    host: str = "127.0.0.1"
    port: int | None = None
    listen_tls: Tls | None = None
    allowed_calling_aets: list[str] = field(default_factory=list)
    workdir: Path = Path("medsight-node")
    store_quota_bytes: int = 2048 << 20
    max_instance_bytes: int = 512 << 20
    stable_age_s: float = 10.0
    lease_s: float = 300.0
    max_attempts: int = 8
    backoff_s: float = 2.0
    backoff_max_s: float = 300.0
    dicomweb: DicomWeb | None = None
    dimse: Dimse | None = None
    retrieve: str = "dicomweb"
    send: str = "dicomweb"
    poll_interval_s: float | None = None
    poll_query: str = "dicomweb"
    poll_filters: dict = field(default_factory=dict)
    routes: list[Route] = field(default_factory=list)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None

    @property
    def db_path(self) -> Path:
        return self.workdir / "worklist.sqlite"

    @property
    def store_dir(self) -> Path:
        return self.workdir / "store"


def _secret(d: dict, where: str) -> str | None:
    if "password" in d:
        raise ConfigError(f"{where}: a password may not be written in the config; use password_env or password_file")
    if d.get("password_env"):
        name = str(d["password_env"])
        if name not in os.environ:
            raise ConfigError(f"{where}: environment variable {name} (password_env) is not set")
        return os.environ[name]
    if d.get("password_file"):
        p = Path(str(d["password_file"])).expanduser()
        try:
            return p.read_text().strip()
        except OSError as e:
            raise ConfigError(f"{where}: cannot read password_file {p}: {e.strerror}") from None
    return None


def _ae(v, where: str) -> str:
    s = str(v)
    if not _AE.match(s) or "\\" in s:
        raise ConfigError(f"{where}: {s!r} is not an AE title (1-16 printable ASCII characters)")
    return s


def parse_config(raw: dict, base: Path | None = None) -> NodeConfig:
    """A config mapping -> NodeConfig; relative paths are taken from ``base`` (the YAML file's folder)."""
    base = base or Path.cwd()
    if not isinstance(raw, dict):
        raise ConfigError("node config: expected a mapping at the top level")
    known = {"ae_title", "listen", "allowed_calling_aets", "workdir", "store_quota_mb", "max_instance_mb",
             "stable_age_s", "lease_s", "retry", "pacs", "retrieve", "send", "poll", "routes", "metrics"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"node config: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")

    def path(v) -> Path:
        p = Path(str(v)).expanduser()
        return p if p.is_absolute() else base / p

    cfg = NodeConfig(ae_title=_ae(raw.get("ae_title", "MEDSIGHT"), "ae_title"))
    listen = raw.get("listen") or {}
    cfg.host = str(listen.get("host", "127.0.0.1"))
    cfg.port = None if listen.get("port") is None else int(listen["port"])
    cfg.listen_tls = _tls(listen.get("tls"), "listen.tls", base, server=True)
    cfg.allowed_calling_aets = [_ae(a, "allowed_calling_aets") for a in raw.get("allowed_calling_aets") or []]
    if cfg.port is not None and not cfg.allowed_calling_aets:
        raise ConfigError("node config: listen is set but allowed_calling_aets is empty (the SCP accepts only listed AEs)")
    cfg.workdir = path(raw.get("workdir", "medsight-node"))
    cfg.store_quota_bytes = int(float(raw.get("store_quota_mb", 2048)) * (1 << 20))
    cfg.max_instance_bytes = int(float(raw.get("max_instance_mb", 512)) * (1 << 20))
    cfg.stable_age_s = float(raw.get("stable_age_s", 10))
    cfg.lease_s = float(raw.get("lease_s", 300))
    retry = raw.get("retry") or {}
    cfg.max_attempts = int(retry.get("max_attempts", 8))
    cfg.backoff_s = float(retry.get("backoff_s", 2))
    cfg.backoff_max_s = float(retry.get("backoff_max_s", 300))
    pacs = raw.get("pacs") or {}
    if pacs.get("dicomweb"):
        d = pacs["dicomweb"]
        if not str(d.get("url", "")).startswith(("http://", "https://")):
            raise ConfigError("pacs.dicomweb.url: expected an http:// or https:// URL")
        if "@" in str(d["url"]).split("/")[2]:
            raise ConfigError("pacs.dicomweb.url: credentials may not be part of the URL; use username + password_env")
        cfg.dicomweb = DicomWeb(url=str(d["url"]).rstrip("/"), username=d.get("username"),
                                password=_secret(d, "pacs.dicomweb"), verify_tls=bool(d.get("verify_tls", True)),
                                ca_bundle=d.get("ca_bundle"))
    if pacs.get("dimse"):
        d = pacs["dimse"]
        cfg.dimse = Dimse(host=str(d["host"]), port=int(d["port"]), ae_title=_ae(d["ae_title"], "pacs.dimse.ae_title"),
                          tls=_tls(d.get("tls"), "pacs.dimse.tls", base, server=False))
    for key in ("retrieve", "send"):
        v = str(raw.get(key, "dicomweb"))
        if v not in ("dicomweb", "dimse"):
            raise ConfigError(f"node config: {key} must be dicomweb or dimse, got {v!r}")
        setattr(cfg, key, v)
        if (cfg.dicomweb if v == "dicomweb" else cfg.dimse) is None and (key == "send" or raw.get("poll")):
            raise ConfigError(f"node config: {key}: {v} needs pacs.{v}")
    if cfg.retrieve == "dimse" and raw.get("poll") and cfg.port is None:
        raise ConfigError("node config: retrieve: dimse (C-MOVE) needs listen.port (the SCP the PACS sends to)")
    if raw.get("poll"):
        p = raw["poll"]
        cfg.poll_interval_s = float(p.get("interval_s", 30))
        cfg.poll_query = str(p.get("query", cfg.retrieve))
        if cfg.poll_query not in ("dicomweb", "dimse"):
            raise ConfigError(f"poll.query must be dicomweb or dimse, got {cfg.poll_query!r}")
        cfg.poll_filters = {str(k): str(v) for k, v in (p.get("filters") or {}).items()}
    routes = raw.get("routes") or []
    if not routes:
        raise ConfigError("node config: routes is empty (no bundle would ever run)")
    names = set()
    for i, r in enumerate(routes):
        if not isinstance(r, dict) or "bundle" not in r:
            raise ConfigError(f"routes[{i}]: expected a mapping with name and bundle")
        name = str(r.get("name") or f"route{i}")
        if name in names or not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", name):
            raise ConfigError(f"routes[{i}]: name {name!r} must be unique, 1-32 of A-Z a-z 0-9 _ . -")
        names.add(name)
        m = r.get("match") or {}

        def lst(v):
            return [] if v is None else [str(x) for x in (v if isinstance(v, list) else [v])]

        desc = m.get("series_description")
        if desc is not None:
            try:
                re.compile(str(desc))
            except re.error as e:
                raise ConfigError(f"routes[{i}].match.series_description: bad regular expression ({e})") from None
        cfg.routes.append(Route(name=name, bundle=path(r["bundle"]), modality=lst(m.get("modality")),
                                body_part=lst(m.get("body_part")),
                                series_description=None if desc is None else str(desc),
                                sop_class=lst(m.get("sop_class"))))
    met = raw.get("metrics") or {}
    cfg.metrics_host = str(met.get("host", "127.0.0.1"))
    cfg.metrics_port = None if met.get("port") is None else int(met["port"])
    return cfg


def load_config(path: str | os.PathLike) -> NodeConfig:
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read node config {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot read node config {p}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    try:
        return parse_config(raw or {}, p.resolve().parent)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"node config {p}: {type(e).__name__}: {e}") from None
