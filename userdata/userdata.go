// Package userdata renders the user-data Hangar gives each instance it
// launches: a short bash script that exports the Hangar URL, the pool and the
// instance's bootstrap token, then fetches and runs the pool's bootstrap
// script (the "runurl" pattern), so that images never need rebuilding when
// the bootstrap changes.
//
// User-data is readable by anything on the instance and by anyone allowed to
// call DescribeInstanceAttribute, so it carries only the per-instance
// bootstrap token, never a worker password. A batched launch's user-data,
// shared by all its instances, carries the batch's enrollment token instead
// (Params.Enroll): each instance trades it, once, for a token of its own,
// and it dies once all have.
//
// The rendered script honours three variables of the environment it runs in;
// cloud-init never sets them, they exist for tests and the local provider:
//
//   - HANGAR_USERDATA_FETCH_ATTEMPTS: how many times to try fetching the
//     bootstrap script (default 25, about ten minutes of capped backoff).
//   - HANGAR_USERDATA_CLOUD_DIR: cloud-init's state directory (default
//     /var/lib/cloud); empty disables the per-boot copy, which a provider
//     that runs user-data on a host it does not own must do.
//   - HANGAR_ROOT: what "/" is to the instance (the local provider), where
//     var/lib/hangar/bootstrap-token is: the bootstrap token the bootstrap
//     saved, which the script uses in place of its own when the file says
//     it descends from its own (Hangar rotates tokens; see
//     scripts/bootstrap/generic.sh).
package userdata

import (
	"encoding/base64"
	"errors"
	"fmt"
	"net/url"
	"path"
	"regexp"
	"sort"
	"strings"

	"github.com/hangar-ci/hangar/internal/shell"
)

// Format selects the shape of the rendered user-data.
type Format string

const (
	// FormatScript is a #!/bin/bash script, which cloud-init runs once per
	// instance.
	FormatScript Format = "script"
	// FormatCloudConfig is a #cloud-config that writes the script to a file
	// and runs it from runcmd.
	FormatCloudConfig Format = "cloud-config"
	// FormatMIME is a multipart/mixed message with the script first and the
	// pool's own #cloud-config (Params.CloudConfig), if any, second.
	FormatMIME Format = "mime"
)

// MaxSize is EC2's user-data limit, in bytes, of the rendered (not base64)
// user-data.
const MaxSize = 16 * 1024

// Params is everything that goes into one instance's user-data.
type Params struct {
	Pool           string            // pool name (validated with shell.ValidName)
	HangarURL      string            // base URL instances use to reach Hangar (http or https, no userinfo/query/fragment)
	BootstrapToken string            // per-instance bearer token; it IS allowed in user-data (the password never is)
	Env            map[string]string // pool env, exported to the bootstrap script; keys validated with shell.ValidEnvName
	Format         Format            // "" means script
	CloudConfig    string            // the user's own #cloud-config, only with FormatMIME (merged as a second MIME part)
	// Cache, when set, is the pool's build cache: exported as
	// HANGAR_CACHE_MOUNT and HANGAR_CACHE_DEVICE for the bootstrap, which
	// mounts the volume before it reports ready.
	Cache *Cache
	// Enroll: the user-data is a batch's, shared by every instance of one
	// launch, and BootstrapToken is the batch's enrollment token, not an
	// instance's. Exported as HANGAR_ENROLL=1: the bootstrap enrolls
	// (POST /bootstrap/v1/enroll with its instance id) to get a token of
	// its own before anything else.
	Enroll bool
	// Identity is "" or IdentitySigned (only with Enroll): exported as
	// HANGAR_IDENTITY, it has the bootstrap send the cloud's signed
	// instance identity document with its enrollment.
	Identity string
}

// IdentitySigned asks enrolling instances for the cloud's signed instance
// identity document.
const IdentitySigned = "signed"

// Cache says where the bootstrap finds and mounts the cache volume.
type Cache struct {
	Mount  string // absolute path
	Device string // /dev/sd[f-p]
}

// Exports returns the variables a rendered script (FormatScript) exports,
// as the instance's shell reads them: for what plays an instance in tests
// and the simulator. Lines that are not an export of a quoted word (or of
// a bare one, such as HANGAR_ENROLL=1) are skipped.
func Exports(userData []byte) map[string]string {
	out := map[string]string{}
	for line := range strings.Lines(string(userData)) {
		kv, ok := strings.CutPrefix(strings.TrimSpace(line), "export ")
		if !ok {
			continue
		}
		k, word, ok := strings.Cut(kv, "=")
		if !ok {
			continue
		}
		if v, quoted := shell.Unquote(word); quoted {
			out[k] = v
		} else if bareWord.MatchString(word) {
			out[k] = word
		}
	}
	return out
}

// bareWord is a word the shell reads as itself, unquoted.
var bareWord = regexp.MustCompile(`^[A-Za-z0-9_./:-]*$`)

// ScriptPath is where the cloud-config form writes the script.
const ScriptPath = "/var/lib/hangar/bootstrap-userdata.sh"

// Render validates p and renders the user-data, reporting every problem at
// once.
func Render(p Params) ([]byte, error) {
	if err := p.validate(); err != nil {
		return nil, err
	}
	script := renderScript(p)
	var out string
	switch p.Format {
	case "", FormatScript:
		out = script
	case FormatCloudConfig:
		out = renderCloudConfig(script)
	case FormatMIME:
		parts := []mimePart{{contentType: "text/x-shellscript", filename: "hangar-userdata.sh", body: script}}
		if p.CloudConfig != "" {
			parts = append(parts, mimePart{contentType: "text/cloud-config", filename: "cloud-config.yaml", body: p.CloudConfig})
		}
		out = renderMIME(parts)
	}
	if len(out) > MaxSize {
		return nil, fmt.Errorf("rendered user-data is %d bytes, over EC2's limit of %d", len(out), MaxSize)
	}
	return []byte(out), nil
}

var (
	tokenRE       = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)
	cacheDeviceRE = regexp.MustCompile(`^/dev/sd[f-p]$`)
)

func (p Params) validate() error {
	var errs []error
	if err := shell.ValidName(p.Pool); err != nil {
		errs = append(errs, fmt.Errorf("pool: %w", err))
	}
	if err := validURL(p.HangarURL); err != nil {
		errs = append(errs, fmt.Errorf("hangar url: %w", err))
	}
	// The token itself never goes into an error: errors end up in logs.
	switch {
	case p.BootstrapToken == "":
		errs = append(errs, errors.New("bootstrap token: empty"))
	case !tokenRE.MatchString(p.BootstrapToken):
		errs = append(errs, errors.New("bootstrap token: has characters other than A-Z, a-z, 0-9, '_' and '-'"))
	}
	for _, k := range sortedKeys(p.Env) {
		if err := shell.ValidEnvName(k); err != nil {
			errs = append(errs, fmt.Errorf("env: %w", err))
		}
		// Env values may be secrets, so only the name is reported.
		if strings.ContainsRune(p.Env[k], 0) {
			errs = append(errs, fmt.Errorf("env %q: value contains a NUL byte, which no environment can hold", k))
		}
	}
	if c := p.Cache; c != nil {
		if !path.IsAbs(c.Mount) || path.Clean(c.Mount) != c.Mount || c.Mount == "/" {
			errs = append(errs, fmt.Errorf("cache mount %q: want a clean absolute path other than /", c.Mount))
		}
		if !cacheDeviceRE.MatchString(c.Device) {
			errs = append(errs, fmt.Errorf("cache device %q: want /dev/sd[f-p]", c.Device))
		}
	}
	switch {
	case p.Identity != "" && p.Identity != IdentitySigned:
		errs = append(errs, fmt.Errorf("identity: unknown identity %q (want %q or nothing)", p.Identity, IdentitySigned))
	case p.Identity != "" && !p.Enroll:
		errs = append(errs, errors.New("identity: only an enrolling (batch) user-data sends one"))
	}
	switch p.Format {
	case "", FormatScript, FormatCloudConfig:
		if p.CloudConfig != "" {
			errs = append(errs, fmt.Errorf("cloud config: only the %q format can carry one", FormatMIME))
		}
	case FormatMIME:
		if p.CloudConfig != "" && !strings.HasPrefix(p.CloudConfig, "#cloud-config") {
			errs = append(errs, errors.New("cloud config: must start with \"#cloud-config\""))
		}
	default:
		errs = append(errs, fmt.Errorf("format: unknown format %q (want %q, %q or %q)", p.Format, FormatScript, FormatCloudConfig, FormatMIME))
	}
	return errors.Join(errs...)
}

func validURL(s string) error {
	u, err := url.Parse(s)
	switch {
	case s == "":
		return errors.New("empty")
	case err != nil:
		return fmt.Errorf("parsing %q: %w", s, err)
	case u.Scheme != "http" && u.Scheme != "https":
		return fmt.Errorf("%q: scheme must be http or https", s)
	case u.Host == "":
		return fmt.Errorf("%q: has no host", s)
	case u.User != nil:
		return fmt.Errorf("%q: must not carry a user or password", s)
	case u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || strings.Contains(s, "#"):
		return fmt.Errorf("%q: must not have a query or fragment", s)
	case strings.ContainsAny(s, " \t\r\n"):
		return fmt.Errorf("%q: must not contain white space", s)
	}
	return nil
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// scriptBody is the part of the script that does not depend on the params.
//
// It never uses set -x, which would echo the token to the console. The token
// reaches curl on stdin (-H @-), not in its arguments, where ps would show it
// to every user of the instance.
const scriptBody = `
log() { printf 'hangar-userdata: %s\n' "$*"; }

# cloud-init runs user-data scripts on the first boot only; a copy in per-boot
# makes an instance that was stopped and started bootstrap again. The copy is
# named after the instance id so that a copy baked into an image from this
# instance does not run, with its dead token, on instances made from it.
cloud_dir=${HANGAR_USERDATA_CLOUD_DIR-/var/lib/cloud}
if [ -n "$cloud_dir" ] && [ -r "$cloud_dir/data/instance-id" ]; then
	per_boot=$cloud_dir/scripts/per-boot
	instance_id=$(<"$cloud_dir/data/instance-id")
	copy=$per_boot/hangar-userdata-$instance_id.sh
	if [ "${0%/*}" = "$per_boot" ] && [ "$0" != "$copy" ]; then
		log "removing $0, left over from the instance this image was made from"
		rm -f "$0"
		exit 0
	fi
	if [ -d "$per_boot" ] && [ -w "$per_boot" ] && [ -f "$0" ] && [ ! -e "$copy" ]; then
		cp "$0" "$copy" && chmod 0700 "$copy" && log "installed $copy to bootstrap again after a stop and start"
	fi
fi

# After a stop and start this runs again with the token it was made with,
# which Hangar refuses once it has rotated it. The bootstrap saves the
# current one after the hash of the token it descends from: the saved one is
# used when that is this one (not when the file comes, in an image, from
# another instance). On the local cloud HANGAR_ROOT is the instance's "/".
token_file=${HANGAR_ROOT-}/var/lib/hangar/bootstrap-token
if [ -r "$token_file" ] && read -r origin saved <"$token_file" && [ -n "$saved" ] &&
	own=$(printf '%s' "$HANGAR_BOOTSTRAP_TOKEN" | sha256sum) && [ "$origin" = "${own%% *}" ]; then
	HANGAR_BOOTSTRAP_TOKEN=$saved
	log "using the bootstrap token saved by an earlier boot"
fi
unset origin saved own

script_url=$HANGAR_URL/bootstrap/v1/script
file=$(mktemp "${TMPDIR:-/tmp}/hangar-bootstrap.XXXXXXXXXX") || { log "cannot create a temporary file"; exit 1; }
chmod 0700 "$file"
# 25 attempts wait 1+2+4+8+16+19*30 seconds in all: about ten minutes.
attempts=${HANGAR_USERDATA_FETCH_ATTEMPTS:-25}
delay=1
for ((attempt = 1; ; attempt++)); do
	code=$(printf 'Authorization: Bearer %s\n' "$HANGAR_BOOTSTRAP_TOKEN" |
		curl -fsS --connect-timeout 10 --max-time 60 -H @- -w '%{http_code}' -o "$file" "$script_url")
	if [ "$code" = 200 ]; then
		log "running the bootstrap script of pool $HANGAR_POOL"
		exec bash "$file"
	fi
	if [ "$attempt" -ge "$attempts" ]; then
		log "giving up: fetching $script_url failed $attempt times in ${SECONDS}s (last HTTP status $code; 401 means Hangar does not know this instance's token)"
		rm -f "$file"
		exit 1
	fi
	log "fetching $script_url failed (HTTP status $code); retrying in ${delay}s"
	sleep "$delay"
	delay=$((delay < 15 ? delay * 2 : 30))
done
`

func renderScript(p Params) string {
	var b strings.Builder
	b.WriteString("#!/bin/bash\n")
	fmt.Fprintf(&b, "# Hangar user-data for pool %s: fetches and runs the pool's bootstrap script.\n", p.Pool)
	b.WriteString("exec 2>&1\nset -u\n")
	fmt.Fprintf(&b, "export HANGAR_URL=%s\n", shell.Quote(strings.TrimRight(p.HangarURL, "/")))
	fmt.Fprintf(&b, "export HANGAR_POOL=%s\n", shell.Quote(p.Pool))
	fmt.Fprintf(&b, "export HANGAR_BOOTSTRAP_TOKEN=%s\n", shell.Quote(p.BootstrapToken))
	if p.Enroll {
		b.WriteString("export HANGAR_ENROLL=1\n")
		if p.Identity != "" {
			fmt.Fprintf(&b, "export HANGAR_IDENTITY=%s\n", shell.Quote(p.Identity))
		}
	}
	if c := p.Cache; c != nil {
		fmt.Fprintf(&b, "export HANGAR_CACHE_MOUNT=%s\n", shell.Quote(c.Mount))
		fmt.Fprintf(&b, "export HANGAR_CACHE_DEVICE=%s\n", shell.Quote(c.Device))
	}
	for _, k := range sortedKeys(p.Env) {
		fmt.Fprintf(&b, "export %s=%s\n", k, shell.Quote(p.Env[k]))
	}
	b.WriteString(scriptBody)
	return b.String()
}

// renderCloudConfig embeds the script as a YAML literal block when every byte
// survives one unchanged (readable in `hangar userdata render`), and as base64
// otherwise (a carriage return or a control character in an env value).
func renderCloudConfig(script string) string {
	var b strings.Builder
	b.WriteString("#cloud-config\n")
	b.WriteString("# Hangar user-data: writes the bootstrap script and runs it once per instance.\n")
	b.WriteString("write_files:\n")
	fmt.Fprintf(&b, "  - path: %s\n", ScriptPath)
	b.WriteString("    owner: root:root\n")
	b.WriteString("    permissions: '0700'\n")
	if plainText(script) && strings.HasSuffix(script, "\n") && !strings.HasSuffix(script, "\n\n") {
		b.WriteString("    content: |\n")
		for _, line := range strings.SplitAfter(strings.TrimSuffix(script, "\n"), "\n") {
			if line != "\n" {
				b.WriteString("      ")
			}
			b.WriteString(line)
		}
		b.WriteString("\n")
	} else {
		b.WriteString("    encoding: b64\n")
		b.WriteString("    content: " + base64.StdEncoding.EncodeToString([]byte(script)) + "\n")
	}
	b.WriteString("runcmd:\n")
	fmt.Fprintf(&b, "  - [%s]\n", ScriptPath)
	return b.String()
}

// plainText reports whether s is printable ASCII, tabs and newlines only:
// text that YAML literal blocks and 7bit MIME parts carry byte for byte.
func plainText(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < ' ' || c > '~') && c != '\t' && c != '\n' {
			return false
		}
	}
	return true
}

type mimePart struct {
	contentType string
	filename    string
	body        string
}

// renderMIME writes the multipart/mixed message cloud-init's make-mime
// would, with a boundary fixed for stable golden files.
func renderMIME(parts []mimePart) string {
	encoded := make([]string, len(parts))
	for i, p := range parts {
		var b strings.Builder
		if plainText(p.body) && maxLineLen(p.body) <= 998 {
			fmt.Fprintf(&b, "Content-Type: %s; charset=\"us-ascii\"\n", p.contentType)
			b.WriteString("MIME-Version: 1.0\nContent-Transfer-Encoding: 7bit\n")
			fmt.Fprintf(&b, "Content-Disposition: attachment; filename=%q\n\n", p.filename)
			// The line break before a boundary belongs to the boundary, so
			// one is added to keep the body's own last one.
			b.WriteString(p.body + "\n")
		} else {
			fmt.Fprintf(&b, "Content-Type: %s; charset=\"utf-8\"\n", p.contentType)
			b.WriteString("MIME-Version: 1.0\nContent-Transfer-Encoding: base64\n")
			fmt.Fprintf(&b, "Content-Disposition: attachment; filename=%q\n\n", p.filename)
			enc := base64.StdEncoding.EncodeToString([]byte(p.body))
			for len(enc) > 76 {
				b.WriteString(enc[:76] + "\n")
				enc = enc[76:]
			}
			b.WriteString(enc + "\n\n")
		}
		encoded[i] = b.String()
	}
	boundary := pickBoundary(encoded)
	var b strings.Builder
	fmt.Fprintf(&b, "Content-Type: multipart/mixed; boundary=%q\nMIME-Version: 1.0\n\n", boundary)
	for _, e := range encoded {
		b.WriteString("--" + boundary + "\n" + e)
	}
	b.WriteString("--" + boundary + "--\n")
	return b.String()
}

// pickBoundary returns the first of a fixed series of boundaries that occurs
// in none of the parts; user env values could hold the first one.
func pickBoundary(parts []string) string {
	for n := 0; ; n++ {
		boundary := fmt.Sprintf("===============hangar%d==", n)
		clash := false
		for _, p := range parts {
			if strings.Contains(p, boundary) {
				clash = true
				break
			}
		}
		if !clash {
			return boundary
		}
	}
}

func maxLineLen(s string) int {
	longest := 0
	for _, line := range strings.Split(s, "\n") {
		longest = max(longest, len(line))
	}
	return longest
}
