"""``cxr-lens``: parse options, build settings, run. Nothing else lives here."""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from pathlib import Path

from dicom_node.errors import ConfigError, ModelError
from dicom_node.settings import Settings, load_settings
from dicom_node.startup import configure_process
from dicom_node.tls import TLSFileError, server_context

EXIT_OK = 0
EXIT_FAILED_INPUTS = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_MODEL = 4



def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, default=os.environ.get("CXR_LENS_CONFIG"),
                        help="TOML configuration file (default: embedded defaults; env CXR_LENS_CONFIG)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set explain.method=layercam (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr-lens", description="Chest radiograph classifier with Grad-CAM "
                                     "explanations, as a DICOM node (Secondary Capture + HL7 ORU^R01).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("explain", help="explain DICOM files offline: overlay.dcm, overlay.png, result.hl7, "
                       "result.json per input")
    _common(p)
    p.add_argument("paths", nargs="+", type=Path, help="DICOM files or directories")
    p.add_argument("-o", "--out", type=Path, required=True, help="output directory")
    p.add_argument("--method", help="explanation method (overrides explain.method)")
    p.add_argument("--model", help="model path (overrides model.path)")

    p = sub.add_parser("audit", help="audit the model on a data set: where its explanations lie, verdict rates, "
                       "a sanity check; DIR/report.html and DIR/audit.json")
    _common(p)
    p.add_argument("paths", nargs="+", type=Path, help="DICOM files or directories")
    p.add_argument("-o", "--out", type=Path, required=True, help="output directory")

    p = sub.add_parser("demo", help="the main job on embedded defaults, on a real sample chest radiograph")
    _common(p)
    p.add_argument("-o", "--out", type=Path, default=Path("demo-out"), help="output directory (default ./demo-out)")

    p = sub.add_parser("serve", help="run the DICOM node (Storage SCP, workers, SC and HL7 senders)")
    _common(p)
    p.add_argument("--role", choices=("all", "ingest", "worker", "sender"), default="all",
                   help="what this process runs: ingest (Storage SCP), worker (model), sender (C-STORE and MLLP "
                   "deliveries) or all (default); roles apart share [storage] url (PostgreSQL) and node.spool_dir")

    p = sub.add_parser("status", help="queue depths, parked items and last errors of a node's spool")
    _common(p)

    p = sub.add_parser("hl7-sink", help="a small MLLP receiver that ACKs and stores messages (demos, tests)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", choices=("AA", "AE", "AR"), default="AA", help="ACK code to answer with")
    p.add_argument("--tls-cert", type=Path, help="MLLP over TLS: the sink's certificate (PEM)")
    p.add_argument("--tls-key", type=Path, help="MLLP over TLS: the certificate's private key (PEM)")
    p.add_argument("--tls-ca", type=Path, help="MLLP over TLS: verify client certificates against these CAs")
    p.add_argument("--tls-require-client-cert", action="store_true", help="mutual TLS (needs --tls-ca)")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("config", help="print the effective configuration (after file, env and --set)")
    _common(p)
    return parser


def _settings(args: argparse.Namespace, extra: list[str] | None = None) -> Settings:
    return load_settings(args.config, [*(extra or []), *args.overrides])


def _sink_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The hl7-sink's TLS context from its --tls-* options; None for plain MLLP."""
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_ca is not None or args.tls_require_client_cert:
            raise ConfigError("--tls-ca and --tls-require-client-cert need --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ConfigError("--tls-cert and --tls-key go together")
    try:
        return server_context(args.tls_cert, args.tls_key, ca_file=args.tls_ca,
                              require_client_cert=args.tls_require_client_cert)
    except TLSFileError as exc:  # it names the setting (cert_file, key_file, ca_file): say the option instead
        option = {"cert_file": "--tls-cert", "key_file": "--tls-key", "ca_file": "--tls-ca"}.get(exc.key, exc.key)
        raise ConfigError(f"{option}: {str(exc).removeprefix(exc.key).strip()}") from exc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_process(verbose=args.verbose)
    try:
        if args.command == "explain":
            from dicom_node.commands import run_explain

            extra = [f"explain.method={args.method!r}"] if args.method else []
            extra += [f"model.path={args.model!r}"] if args.model else []
            return run_explain(_settings(args, extra), args.paths, args.out)
        if args.command == "audit":
            from dicom_node.commands import run_audit

            return run_audit(_settings(args), args.paths, args.out)
        if args.command == "demo":
            from dicom_node.commands import run_demo

            return run_demo(_settings(args), args.out)
        if args.command == "serve":
            from dicom_node.commands import run_serve

            return run_serve(_settings(args), role=args.role)
        if args.command == "status":
            from dicom_node.commands import run_status

            return run_status(_settings(args))
        if args.command == "hl7-sink":
            from dicom_node.peers.hl7_sink import run_sink_forever

            run_sink_forever(args.host, args.port, args.out, args.mode, ssl_context=_sink_tls(args))
            return EXIT_OK
        if args.command == "config":
            print(_settings(args).model_dump_json(indent=2))
            return EXIT_OK
    except ConfigError as exc:
        print(f"cxr-lens: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ModelError as exc:
        print(f"cxr-lens: model error: {exc}", file=sys.stderr)
        return EXIT_MODEL
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
