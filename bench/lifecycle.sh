#!/usr/bin/env bash
# Times WorkSpace launch (2 x 10 GiB encrypted volumes, 1 GiB bundle, empty user volume) and
# reboot, three times each, against a throwaway kms-daemon. Needs root and a debug build.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd); W=$(mktemp -d /tmp/lt.XXXX); mkdir -p $W/kms
$REPO/target/debug/kms-daemon --state-dir $W/kms --listen 127.0.0.1:0 --ready-file $W/ready >/dev/null 2>$W/kms.log & KP=$!
trap 'set +e; for id in $(SEALVOL_STATE_DIR=$W/s AWS_PROFILE=alice $REPO/target/debug/sealvol describe-workspaces --output json | python3 -c "import json,sys; print(\" \".join(w[\"WorkspaceId\"] for w in json.load(sys.stdin)[\"Workspaces\"]))"); do SEALVOL_STATE_DIR=$W/s AWS_PROFILE=alice $REPO/target/debug/sealvol terminate-workspaces --workspace-ids $id >/dev/null; done; kill $KP; rm -rf $W' EXIT
for i in $(seq 100); do [ -s $W/ready ] && break; sleep 0.1; done
export AWS_CONFIG_FILE=$W/kms/config AWS_SHARED_CREDENTIALS_FILE=$W/kms/credentials AWS_PROFILE=alice SEALVOL_STATE_DIR=$W/s AWS_EC2_METADATA_DISABLED=true
S=$REPO/target/debug/sealvol
KEY=$($REPO/.venv/bin/aws --profile admin kms create-key --policy file://$REPO/kms-daemon/policies/workspaces-key-policy.json --query KeyMetadata.Arn --output text)
$S register-directory --directory-id d-906734f0a1 >/dev/null
mkdir -p $W/b/etc; echo x > $W/b/etc/hostname
$S create-bundle --bundle-id wsb-t1 --from-dir $W/b --size-gib 1 >/dev/null
for u in u1 u2 u3; do
  $S create-user --directory-id d-906734f0a1 --user-name $u >/dev/null
  s=$(date +%s.%N)
  WS=$($S create-workspaces --directory-id d-906734f0a1 --user-name $u --bundle-id wsb-t1 --volume-encryption-key $KEY --root-volume-encryption-enabled --user-volume-encryption-enabled --root-volume-size-gib 10 --user-volume-size-gib 10 --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)["PendingRequests"][0]["WorkspaceId"])')
  e=$(date +%s.%N); echo "launch $u: $(echo "$e - $s" | bc) s"
  s=$(date +%s.%N); $S reboot-workspaces --workspace-ids $WS >/dev/null; e=$(date +%s.%N); echo "reboot $u: $(echo "$e - $s" | bc) s"
done
