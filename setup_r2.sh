#!/usr/bin/env bash
# setup_r2.sh: prepare catbird-server to keep message ciphertext in Cloudflare R2 (or any
# S3-compatible store). Checks .env, builds the server and runs `catbird-server
# setup-bucket` (probe object + lifecycle rule). Safe to re-run. See R2_SETUP.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: ./setup_r2.sh [--help]

Prepares catbird-server to store message blobs in Cloudflare R2 (or any
S3-compatible store):

  1. If .env is missing, copies .env.example to .env, says which R2 variables
     to fill in, and stops (exit 1).
  2. Reads .env (KEY=VALUE lines only; nothing in it is executed). Variables
     already set in the environment win over .env, as in the server itself.
  3. Refuses to go on while a required variable is missing or still a
     placeholder (empty, or containing "your-", "<", "changeme", "xxx",
     "example"), naming each one:
       BLOB_BACKEND          r2 (or its alias s3)
       R2_ACCOUNT_ID         Cloudflare account id  (or R2_ENDPOINT instead,
       R2_ENDPOINT           e.g. http://127.0.0.1:9000 for another S3 store)
       R2_BUCKET             the bucket you created
       R2_ACCESS_KEY_ID      from the R2 API token
       R2_SECRET_ACCESS_KEY  from the R2 API token
  4. Builds the server with `cargo build --release` (the first build can take
     a few minutes).
  5. Runs `catbird-server setup-bucket`: writes, reads and deletes a probe
     object, then installs the lifecycle rule "catbird-retention" (keeping the
     bucket's other rules).
  6. Prints the next steps.

Environment:
  CATBIRD_PROFILE=debug   build and run the debug binary (`cargo build`,
                          target/debug/catbird-server) instead of release;
                          quicker to build, for trying the script out.
                          Default: release.
  CARGO_TARGET_DIR        honoured as by cargo (where the binary is built).

Exit status: 0 when the bucket is ready; non-zero otherwise (the message says
what to fix). Details: R2_SETUP.md.
EOF
}

for arg in "$@"; do
    case "$arg" in
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "setup_r2.sh: unknown argument: $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

# Work from the repository root (where this script lives), whatever the caller's folder.
cd "$(dirname "${BASH_SOURCE[0]}")"

if [[ -t 1 ]]; then
    bold=$'\e[1m' red=$'\e[31m' green=$'\e[32m' yellow=$'\e[33m' reset=$'\e[0m'
else
    bold='' red='' green='' yellow='' reset=''
fi
say() { printf '%s\n' "$*"; }
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$reset"; }
warn() { printf '%swarning:%s %s\n' "$yellow" "$reset" "$*" >&2; }
die() {
    printf '%serror:%s %s\n' "$red" "$reset" "$*" >&2
    exit 1
}

fill_in_help() {
    cat <<'EOF'
Set these in .env (remove the leading "# " where a line is commented out):

  BLOB_BACKEND=r2
  R2_ACCOUNT_ID=<your Cloudflare account id>     # or R2_ENDPOINT=https://... for another S3 store
  R2_BUCKET=catbird-messages                     # the bucket you created
  R2_ACCESS_KEY_ID=<Access Key ID of the R2 API token>
  R2_SECRET_ACCESS_KEY=<Secret Access Key of the R2 API token>

Where to find each value in the Cloudflare dashboard: R2_SETUP.md.
Then run ./setup_r2.sh again.
EOF
}

# --- 1. .env -------------------------------------------------------------------------

if [[ ! -f .env ]]; then
    if [[ -f .env.example ]]; then
        cp .env.example .env
        chmod 600 .env # it is about to hold credentials
        step "Created .env from .env.example"
        fill_in_help
        exit 1
    fi
    step "No .env, and no .env.example to start from"
    say ".env.example is part of the repository; if it is not here yet, update your"
    say "checkout (git pull), or create .env yourself with the lines below."
    say
    fill_in_help
    exit 1
fi

# --- 2. Load .env without executing it -----------------------------------------------

# Written for bash 3.2 too (macOS's /bin/bash): no associative arrays, no ${v,,}, no [[ -v ]].
from_file=' ' # names this script took from .env, space-separated (the rest came from the environment)
is_set() { declare -p "$1" >/dev/null 2>&1; }
lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }

strip_value() {
    # A value as dotenv files write it: 'single' or "double" quoted, or bare with an
    # optional trailing " # comment".
    local v=$1
    v="${v#"${v%%[![:space:]]*}"}" # leading blanks
    if [[ $v =~ ^\"(.*)\"[[:space:]]*(#.*)?$ ]]; then
        v=${BASH_REMATCH[1]}
        v=${v//\\\"/\"}
    elif [[ $v =~ ^\'(.*)\'[[:space:]]*(#.*)?$ ]]; then
        v=${BASH_REMATCH[1]}
    else
        v=${v%%[[:space:]]#*}          # " # comment"
        v="${v%"${v##*[![:space:]]}"}" # trailing blanks
    fi
    printf '%s' "$v"
}

lineno=0
while IFS= read -r line || [[ -n $line ]]; do
    lineno=$((lineno + 1))
    line=${line%$'\r'}
    line="${line#"${line%%[![:space:]]*}"}"
    [[ -z $line || $line == \#* ]] && continue
    line=${line#export }
    if [[ ! $line =~ ^([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*=(.*)$ ]]; then
        warn ".env line $lineno is not KEY=VALUE; ignored"
        continue
    fi
    key=${BASH_REMATCH[1]}
    value=$(strip_value "${BASH_REMATCH[2]}")
    # The environment wins over .env (and the first line for a name wins over later ones),
    # exactly as the server's own .env loading does.
    if is_set "$key"; then
        continue
    fi
    # shellcheck disable=SC2016 # a literal ${ is what we look for
    if [[ $value == *'${'* ]]; then
        warn ".env line $lineno ($key) uses \${...}; this script passes it on literally"
    fi
    export "$key=$value"
    from_file="$from_file$key "
done <.env

if [[ -n $(find .env -maxdepth 0 -perm -o+r 2>/dev/null) ]]; then
    warn ".env is readable by every user on this machine; consider: chmod 600 .env"
fi

# --- 3. Check the required variables -------------------------------------------------

where() { if [[ $from_file == *" $1 "* ]]; then say ".env"; else say "environment"; fi; }

placeholder() {
    local v
    v=$(lower "$1")
    [[ -z ${v//[[:space:]]/} || $v == *your-* || $v == *'<'* || $v == *changeme* ||
        $v == *change-me* || $v == *xxx* || $v == *example* ]]
}

problems=()
# check NAME SECRET: NAME must be set and not a placeholder; SECRET=1 never prints the value.
check() {
    local name=$1 secret=$2
    if ! is_set "$name"; then
        problems+=("$name is not set")
    elif placeholder "${!name}"; then
        if [[ $secret == 1 || -z ${!name} ]]; then
            problems+=("$name is empty or still a placeholder (from $(where "$name"))")
        else
            problems+=("$name=\"${!name}\" is a placeholder (from $(where "$name"))")
        fi
    else
        return 0
    fi
    return 1
}

case "${BLOB_BACKEND-}" in
    r2 | s3) ;;
    "") problems+=("BLOB_BACKEND is not set: set BLOB_BACKEND=r2 (otherwise the server keeps blobs on local disk)") ;;
    *) problems+=("BLOB_BACKEND=\"$BLOB_BACKEND\" (from $(where BLOB_BACKEND)): set BLOB_BACKEND=r2 to keep blobs in R2") ;;
esac

# R2_ENDPOINT, when set, overrides R2_ACCOUNT_ID (as in the server); only the one used is checked.
if [[ -n ${R2_ENDPOINT:-} ]]; then
    if check R2_ENDPOINT 0 && [[ ! $R2_ENDPOINT =~ ^https?://. ]]; then
        problems+=("R2_ENDPOINT=\"$R2_ENDPOINT\" must start with https:// (or http:// for a local store)")
    fi
elif is_set R2_ACCOUNT_ID; then
    if check R2_ACCOUNT_ID 0 && [[ ! $R2_ACCOUNT_ID =~ ^[A-Za-z0-9]+$ ]]; then
        problems+=("R2_ACCOUNT_ID=\"$R2_ACCOUNT_ID\" must be the account id alone (letters and digits), not a URL")
    fi
else
    problems+=("neither R2_ACCOUNT_ID nor R2_ENDPOINT is set: set R2_ACCOUNT_ID (Cloudflare) or R2_ENDPOINT (another S3 store)")
fi

if check R2_BUCKET 0 && [[ ! $R2_BUCKET =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]]; then
    problems+=("R2_BUCKET=\"$R2_BUCKET\" must be 3 to 63 lowercase letters, digits, '-' or '.'")
fi
check R2_ACCESS_KEY_ID 1 || true
check R2_SECRET_ACCESS_KEY 1 || true

if ((${#problems[@]} > 0)); then
    step "Not ready yet: fix these, then run ./setup_r2.sh again"
    for p in "${problems[@]}"; do
        printf '  %s-%s %s\n' "$red" "$reset" "$p"
    done
    say
    fill_in_help
    exit 1
fi

say "Configuration looks complete:"
say "  BLOB_BACKEND=$BLOB_BACKEND"
if [[ -n ${R2_ENDPOINT:-} ]]; then
    say "  R2_ENDPOINT=$R2_ENDPOINT"
else
    say "  R2_ACCOUNT_ID=$R2_ACCOUNT_ID  (endpoint https://$R2_ACCOUNT_ID.r2.cloudflarestorage.com)"
fi
say "  R2_BUCKET=$R2_BUCKET  R2_PREFIX=${R2_PREFIX-messages/ (default)}  MESSAGE_TTL=${MESSAGE_TTL-30d (default)}"
say "  R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY are set (not shown)"

# --- 4. Build --------------------------------------------------------------------------

profile=${CATBIRD_PROFILE:-release}
case "$profile" in
    release) build=(cargo build --release) ;;
    debug) build=(cargo build) ;;
    *) die "CATBIRD_PROFILE must be release or debug (got \"$profile\")" ;;
esac
bin="${CARGO_TARGET_DIR:-target}/$profile/catbird-server"

command -v cargo >/dev/null 2>&1 ||
    die "cargo not found: install Rust (https://rustup.rs), open a new shell, and run ./setup_r2.sh again"

step "Building catbird-server (${build[*]}); the first build may take a few minutes"
"${build[@]}" || die "the build failed (see cargo's messages above)"
[[ -x $bin ]] || die "the build finished but $bin is missing (is CARGO_TARGET_DIR set differently?)"

# --- 5. setup-bucket ---------------------------------------------------------------------

step "Checking the bucket and installing the lifecycle rule ($bin setup-bucket)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
"$bin" setup-bucket 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

if ((status != 0)); then
    say
    if grep -q 'lifecycle configuration failed' "$log"; then
        say "${red}The bucket works for messages, but the lifecycle rule could not be read or written.${reset}"
        say "On R2 an \"Object Read & Write\" token may not read or edit bucket settings such as"
        say "lifecycle rules; that needs an \"Admin Read & Write\" token. Either:"
        say "  - run this script once with an Admin Read & Write token in the environment, e.g."
        say "      R2_ACCESS_KEY_ID=<admin id> R2_SECRET_ACCESS_KEY=<admin secret> ./setup_r2.sh"
        say "    (the environment wins over .env; keep the Object Read & Write token in .env), or"
        say "  - add the rule in the dashboard: R2 > ${R2_BUCKET} > Settings > Object lifecycle rules >"
        say "    Add rule: name catbird-retention, prefix ${R2_PREFIX-messages/}, delete objects after"
        say "    MESSAGE_TTL + 1 day, rounded up to whole days (31 days for the default 30d)."
        say "The server runs without the rule: expiry is enforced from the database, and the rule is"
        say "only a backstop for blobs a crash left behind. See R2_SETUP.md, \"Troubleshooting\"."
    elif grep -qiE 'dispatch failure|connect|timed out|timeout|dns|resolve' "$log"; then
        say "${red}Could not reach the object store.${reset} Check R2_ACCOUNT_ID / R2_ENDPOINT, this"
        say "machine's network and firewall (outbound HTTPS), and R2_CONNECT_TIMEOUT / R2_TIMEOUT."
        say "See R2_SETUP.md, \"Troubleshooting\" (C04, C06)."
    else
        say "${red}setup-bucket failed${reset} (exit $status); its message above says which step and what"
        say "to check. See R2_SETUP.md, \"Troubleshooting\"."
    fi
    exit "$status"
fi

# --- 6. Next steps -----------------------------------------------------------------------

port=${PORT:-3000}
host=${HOST:-127.0.0.1}
[[ $host == 0.0.0.0 ]] && host=127.0.0.1
cat <<EOF

${green}${bold}R2 is ready for catbird-server.${reset}

Next steps:
  1. Start the server (it reads .env too):
       BLOB_BACKEND=r2 $bin
  2. Check that it can reach the database and the bucket:
       curl -s http://$host:$port/readyz
     expect {"status":"ok","database":"ok","blob_store":"ok"}; a 503 names what failed.
  3. Clean-up of expired and delivered messages runs every GC_INTERVAL (default 1h).
     To run one pass by hand (e.g. from cron):  $bin gc
  4. Send and fetch a test message with curl: R2_SETUP.md, "Verify".

Docs: R2_SETUP.md (setup, troubleshooting), CLOUDFLARE_R2_MIGRATION_SUMMARY.md
(architecture, iOS client usage, costs), docs/API.md (HTTP API).
Re-running ./setup_r2.sh is safe: it changes only the catbird-retention rule.
EOF
