#!/usr/bin/env bash
# Make the certificates and keys of a fedvit deployment (openssl + ssh-keygen).
#
#   scripts/make_certs.sh [-o DIR] [-n NUM_SUPERNODES] [-d DAYS] ADDRESS...
#
# ADDRESS: every host name or IP address that SuperNodes, `flwr` or the SuperExec use to reach
# the SuperLink (e.g. `superlink`, `server.example.org`, `10.0.0.5`); each becomes a SAN of the
# SuperLink certificate. `localhost` and 127.0.0.1 are always added.
# Writes into DIR (default ./certs):
#   ca.crt / ca.key                   the CA (keep ca.key offline; ca.crt goes to every device)
#   server.pem / server.key           the SuperLink certificate (SANs) and key
#   supernode-<i> / supernode-<i>.pub SuperNode i's authentication key pair (ECDSA P-384,
#                                     OpenSSH format, as flower-supernode and
#                                     `flwr supernode register` read them), i = 0 .. N-1
# SuperLink: flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem
#            --ssl-keyfile server.key --enable-supernode-auth ...
# SuperNode: flower-supernode --root-certificates ca.crt --auth-supernode-private-key supernode-<i> ...
# Register:  flwr supernode register supernode-<i>.pub <connection>
set -euo pipefail

out=certs
num=0
days=365
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while getopts "o:n:d:h" opt; do
  case "$opt" in
    o) out=$OPTARG ;;
    n) num=$OPTARG ;;
    d) days=$OPTARG ;;
    h) usage 0 ;;
    *) usage 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "$num" =~ ^[0-9]+$ ]] || { echo "make_certs.sh: -n needs a number, got '$num'" >&2; exit 2; }
command -v openssl >/dev/null || { echo "make_certs.sh: openssl not found" >&2; exit 1; }

# SAN list: every address given, plus localhost and 127.0.0.1 (IP literals as IP:, names as DNS:).
declare -A seen=()
sans=()
for addr in "$@" localhost 127.0.0.1; do
  [[ -n "${seen[$addr]:-}" ]] && continue
  seen[$addr]=1
  if [[ "$addr" =~ ^[0-9]+(\.[0-9]+){3}$ || "$addr" == *:* ]]; then
    sans+=("IP:$addr")
  else
    sans+=("DNS:$addr")
  fi
done
san=$(IFS=,; echo "${sans[*]}")

mkdir -p "$out"
cd "$out"
umask 077
openssl req -x509 -newkey rsa:2048 -sha256 -days "$days" -nodes -keyout ca.key -out ca.crt \
  -subj "/CN=fedvit-ca" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey rsa:2048 -sha256 -nodes -keyout server.key -out server.csr \
  -subj "/CN=${1:-localhost}" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.pem \
  -days "$days" -sha256 -extfile server.ext 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 644 ca.crt server.pem

for ((i = 0; i < num; i++)); do
  rm -f "supernode-$i" "supernode-$i.pub"
  if command -v ssh-keygen >/dev/null; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedvit-supernode-$i" -f "supernode-$i"
  else  # the same OpenSSH-format ECDSA key with Python's cryptography (a Flower dependency)
    python3 - "supernode-$i" <<'PY'
import sys
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP384R1())
open(sys.argv[1], "wb").write(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption()))
open(sys.argv[1] + ".pub", "wb").write(key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH))
PY
  fi
  chmod 644 "supernode-$i.pub"
done
echo "wrote $(pwd): ca.crt server.pem server.key ($san) and $num SuperNode key pair(s)"
