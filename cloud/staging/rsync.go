package staging

// This file moves trees with the rsync binary over ssh: from and to this
// machine (Rsync), and from one server straight to another (RemoteRsync).

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hangar-ci/hangar/internal/shell"
	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"
	"golang.org/x/crypto/ssh/knownhosts"
)

// Endpoint is a host that rsync reaches over ssh.
type Endpoint struct {
	User string // "" leaves the choice to ssh
	Host string // a name or an IP address
	Port int    // 0 means ssh's default, 22
	// Sudo runs the remote rsync (or dd) as root with sudo -n.
	Sudo bool
	// HostKeyAlias is the name the host key is pinned under, as OpenSSH's
	// HostKeyAlias (staging servers are pinned under their instance id);
	// "" means the host and port.
	HostKeyAlias string
}

// String is the endpoint as user@host:port.
func (e Endpoint) String() string {
	s := net.JoinHostPort(e.Host, strconv.Itoa(orDefault(e.Port, 22)))
	if e.User != "" {
		s = e.User + "@" + s
	}
	return s
}

// validate rejects what ssh or rsync would read as something else: an
// option, a second host, a user or a path.
func (e Endpoint) validate() error {
	bad := func(what, v, why string) error {
		return fmt.Errorf("endpoint %s: %s %q %s", e, what, v, why)
	}
	switch {
	case e.Host == "":
		return fmt.Errorf("endpoint %s: no host", e)
	case strings.HasPrefix(e.Host, "-"):
		return bad("host", e.Host, "starts with '-'")
	case strings.ContainsAny(e.Host, "@/[]") || strings.Contains(e.Host, ":") && net.ParseIP(e.Host) == nil:
		return bad("host", e.Host, "is not a host name or IP address")
	case hasSpaceOrControl(e.Host):
		return bad("host", e.Host, "holds spaces or control characters")
	case strings.HasPrefix(e.User, "-") || strings.ContainsAny(e.User, "@:/") || hasSpaceOrControl(e.User):
		return bad("user", e.User, "is not a user name")
	case e.Port < 0 || e.Port > 65535:
		return fmt.Errorf("endpoint %s: port %d out of range", e, e.Port)
	case e.HostKeyAlias != "" && !safeWord(e.HostKeyAlias):
		return bad("host key alias", e.HostKeyAlias, "holds characters other than letters, digits and ._:-")
	}
	return nil
}

// userHost is the endpoint as rsync's [user@]host.
func (e Endpoint) userHost() string {
	h := e.Host
	if strings.Contains(h, ":") {
		h = "[" + h + "]"
	}
	if e.User != "" {
		h = e.User + "@" + h
	}
	return h
}

// Path is a place for rsync: a path on Host, or on this machine when Host
// is nil.
type Path struct {
	Host *Endpoint
	Path string
}

// String is the path as rsync would show it, with a port that is not 22.
func (p Path) String() string {
	if p.Host == nil {
		return p.Path
	}
	s := p.Host.userHost() + ":" + p.Path
	if p.Host.Port != 0 && p.Host.Port != 22 {
		s += " (port " + strconv.Itoa(p.Host.Port) + ")"
	}
	return s
}

// RsyncOptions says how Rsync and RemoteRsync run rsync.
type RsyncOptions struct {
	// KeyPath and KnownHostsPath are Hangar's private key and pinned
	// known_hosts (see LoadOrCreateKey and KnownHosts). With both set, ssh
	// uses that key only, trusts those pins only and ignores ssh_config;
	// with both empty, ssh runs with the user's own setup (for hosts that
	// Hangar does not manage). RemoteRsync uses neither: it forwards the
	// key by agent and is given the pins.
	KeyPath, KnownHostsPath string
	// Extra are more rsync options from the user, after Hangar's own.
	Extra []string
	// Delete passes --delete: remove files from the destination that the
	// sources do not have.
	Delete bool
	// Progress, when not nil, receives rsync's warnings as they come, and
	// with LiveProgress its progress (--info=progress2: one line rewritten
	// with carriage returns, which only a terminal shows as meant); nil
	// keeps rsync quiet.
	Progress     io.Writer
	LiveProgress bool
	// Log, when not nil, gets each rsync command at debug level.
	Log *slog.Logger
}

// RsyncError reports an rsync that ran and failed.
type RsyncError struct {
	// Command is the rsync command line, quoted for a POSIX shell. It
	// names the key file but never holds key material.
	Command string
	// Host is where rsync ran: "" for this machine, else the server's
	// address (RemoteRsync).
	Host string
	// Status is rsync's exit status (see RsyncStatusText); 255 says ssh
	// failed, -1 that rsync was killed by a signal.
	Status int
	// Stderr is the last few KiB of rsync's (and ssh's) standard error.
	Stderr string
	// Err is ErrHostKeyChanged or ErrUnknownHost when ssh refused the
	// server's host key, else nil.
	Err error
}

func (e *RsyncError) Error() string {
	msg := "rsync"
	if e.Host != "" {
		msg += " on " + e.Host
	}
	if e.Status < 0 {
		msg += " was killed"
	} else {
		msg += fmt.Sprintf(" exited with status %d", e.Status)
		if text := RsyncStatusText(e.Status); text != "" {
			msg += " (" + text + ")"
		}
	}
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	if s := strings.TrimSpace(e.Stderr); s != "" {
		msg += ": " + s
	}
	return msg
}

func (e *RsyncError) Unwrap() error { return e.Err }

// RsyncStatusText says what an rsync exit status means (from rsync(1)),
// or "" for one it does not know.
func RsyncStatusText(status int) string {
	switch status {
	case 1:
		return "syntax or usage error"
	case 2:
		return "protocol incompatibility"
	case 3:
		return "errors selecting input/output files, dirs"
	case 4:
		return "requested action not supported"
	case 5:
		return "error starting client-server protocol"
	case 10:
		return "error in socket I/O"
	case 11:
		return "error in file I/O"
	case 12:
		return "error in rsync protocol data stream"
	case 13:
		return "errors with program diagnostics"
	case 14:
		return "error in IPC code"
	case 20:
		return "received SIGUSR1 or SIGINT"
	case 21:
		return "some error returned by waitpid()"
	case 22:
		return "error allocating core memory buffers"
	case 23:
		return "partial transfer due to error"
	case 24:
		return "partial transfer due to vanished source files"
	case 25:
		return "the --max-delete limit stopped deletions"
	case 30:
		return "timeout in data send/receive"
	case 35:
		return "timeout waiting for daemon connection"
	case 126, 127:
		return "rsync could not be run; is it installed on the server?"
	case 255:
		return "ssh failed: connection, login or host key"
	}
	return ""
}

// hostKeyError recognises OpenSSH's refusal of a host key in its stderr.
// OpenSSH's messages are not translated, so matching them is reliable.
func hostKeyError(stderr string) error {
	switch {
	case strings.Contains(stderr, "REMOTE HOST IDENTIFICATION HAS CHANGED"):
		return fmt.Errorf("%w: the server's key is not the one pinned for it; refusing it", ErrHostKeyChanged)
	case strings.Contains(stderr, "host key is known for") && strings.Contains(stderr, "Host key verification failed"):
		return fmt.Errorf("%w: no key is pinned for the server", ErrUnknownHost)
	}
	return nil
}

// Rsync copies sources to dest with this machine's rsync, in archive mode
// (-a: permissions, times, symbolic links, and owners and devices when run
// as root; add -H to Extra for hard links). rsync's trailing-slash rule
// holds: "dir" copies the directory, "dir/" what it holds.
//
// All sources must be on one host, and at most one side may be remote (a
// copy between two servers is RemoteRsync's). Paths reach rsync as they
// are: remote ones go over rsync's protocol (-s), so no remote shell splits
// or expands them, and wildcards in a remote source are escaped, so every
// path names one file. A name holding both a backslash and a wildcard
// character is the one rsync cannot fetch by name; it fails with status 4.
//
// A failed rsync gives an *RsyncError; cancelling ctx kills rsync and its
// ssh.
func Rsync(ctx context.Context, opts RsyncOptions, sources []Path, dest Path) error {
	what := describeCopy(sources, dest)
	if err := checkRsync(opts, sources, dest); err != nil {
		return fmt.Errorf("rsync %s: %w", what, err)
	}
	remote := dest.Host
	for _, s := range sources {
		if s.Host != nil {
			remote = s.Host
		}
	}
	args := []string{"-a", "-s"}
	if remote != nil {
		rsh, err := localSSHCommand(opts, *remote)
		if err != nil {
			return fmt.Errorf("rsync %s: %w", what, err)
		}
		args = append(args, "-e", rsh)
		if remote.Sudo {
			args = append(args, "--rsync-path=sudo -n rsync")
		}
	}
	args = append(args, commonArgs(opts)...)
	args = append(args, "--")
	for _, s := range sources {
		args = append(args, rsyncArg(s, true))
	}
	args = append(args, rsyncArg(dest, false))

	rsyncPath, err := exec.LookPath("rsync")
	if err != nil {
		return fmt.Errorf("rsync %s: the rsync program is needed on this machine: %w", what, err)
	}
	cmd := exec.CommandContext(ctx, rsyncPath, args...)
	cmd.Env = rsyncEnv()
	// rsync and the ssh it starts share a process group, so that
	// cancelling kills both: ssh left alone would keep the remote rsync
	// waiting on a connection no one reads.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = killWait
	tail := &tailBuffer{max: stderrTail}
	progress := &guardWriter{w: lockedWriter(opts.Progress)}
	defer progress.close()
	cmd.Stdout = progress
	cmd.Stderr = io.MultiWriter(tail, progress)

	line := quoteCommand("rsync", args)
	if opts.Log != nil {
		opts.Log.Debug("running rsync", "copy", what, "command", line)
	}
	err = cmd.Run()
	if err != nil && ctx.Err() != nil {
		return fmt.Errorf("rsync %s: %w", what, ctx.Err())
	}
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) {
		stderr := tail.String()
		return fmt.Errorf("rsync %s: %w", what, &RsyncError{
			Command: line, Status: exitErr.ExitCode(), Stderr: stderr, Err: hostKeyError(stderr),
		})
	}
	if err != nil {
		return fmt.Errorf("rsync %s: %w", what, err)
	}
	return nil
}

func describeCopy(sources []Path, dest Path) string {
	names := make([]string, len(sources))
	for i, s := range sources {
		names[i] = strconv.Quote(s.String())
	}
	return "from " + strings.Join(names, ", ") + " to " + strconv.Quote(dest.String())
}

func checkRsync(opts RsyncOptions, sources []Path, dest Path) error {
	if len(sources) == 0 {
		return errors.New("no sources")
	}
	if (opts.KeyPath == "") != (opts.KnownHostsPath == "") {
		return errors.New("KeyPath and KnownHostsPath go together: Hangar's key with Hangar's pins, or neither")
	}
	if err := checkExtra(opts.Extra); err != nil {
		return err
	}
	first := sources[0].Host
	for _, p := range append(sources, dest) {
		if err := checkPath(p); err != nil {
			return err
		}
	}
	for _, s := range sources[1:] {
		if (s.Host == nil) != (first == nil) || s.Host != nil && *s.Host != *first {
			return fmt.Errorf("sources %q and %q are on different hosts; copy them one host at a time", sources[0], s)
		}
	}
	if first != nil && dest.Host != nil {
		return errors.New("both sides are remote; copy between servers with RemoteRsync, or through a local directory")
	}
	return nil
}

func checkPath(p Path) error {
	if strings.IndexByte(p.Path, 0) >= 0 {
		return fmt.Errorf("path %q holds a NUL byte", p.Path)
	}
	if p.Host == nil {
		if p.Path == "" {
			return errors.New("empty local path")
		}
		return nil
	}
	// "" is the remote user's home directory, as in rsync.
	return p.Host.validate()
}

// checkExtra rejects a "--", which would make the options after it paths.
func checkExtra(extra []string) error {
	for _, e := range extra {
		if e == "--" {
			return errors.New(`extra rsync options hold "--"`)
		}
	}
	return nil
}

// commonArgs are the options that Rsync and RemoteRsync share.
func commonArgs(opts RsyncOptions) []string {
	var args []string
	if opts.Delete {
		args = append(args, "--delete")
	}
	if opts.Progress != nil && opts.LiveProgress {
		args = append(args, "--info=progress2")
	}
	return append(args, opts.Extra...)
}

// rsyncArg turns p into the argument rsync reads as that path.
func rsyncArg(p Path, source bool) string {
	path := p.Path
	// A relative path could pass for an option ("-x") or, with a colon
	// before any slash, for a host ("a:b"); "./" keeps it a path and
	// keeps its trailing slash.
	if !strings.HasPrefix(path, "/") && (strings.HasPrefix(path, "-") || strings.Contains(strings.SplitN(path, "/", 2)[0], ":")) {
		path = "./" + path
	}
	if p.Host == nil {
		return path
	}
	if source {
		path = escapeRemoteSource(path)
	}
	return p.Host.userHost() + ":" + path
}

// escapeRemoteSource keeps the remote rsync from expanding wildcards in a
// source path. It expands a path that holds *, ? or [ (and then reads a
// backslash as an escape); any other path it takes literally, backslashes
// included, so those are left alone.
func escapeRemoteSource(path string) string {
	if !strings.ContainsAny(path, "*?[") {
		return path
	}
	var b strings.Builder
	for _, r := range path {
		if strings.ContainsRune(`*?[]\`, r) {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String()
}

// sshBaseArgs are the ssh options every copy uses: never prompt (a prompt
// would hang a copy that has no terminal), give up on a host that does not
// answer, and notice a connection that died.
func sshBaseArgs() []string {
	return []string{
		"-o", "BatchMode=yes",
		"-o", "ConnectTimeout=" + strconv.Itoa(int(connectTimeout/time.Second)),
		"-o", "ServerAliveInterval=15",
		"-o", "ServerAliveCountMax=4",
	}
}

// localSSHCommand is rsync's -e for reaching ep from this machine.
func localSSHCommand(opts RsyncOptions, ep Endpoint) (string, error) {
	words := []string{"ssh"}
	if opts.KeyPath != "" {
		key, err := sshConfigPath(opts.KeyPath)
		if err != nil {
			return "", fmt.Errorf("ssh key: %w", err)
		}
		kh, err := sshConfigPath(opts.KnownHostsPath)
		if err != nil {
			return "", fmt.Errorf("known hosts: %w", err)
		}
		// -F /dev/null: the user's ssh_config could add keys, a proxy or
		// looser host key checking; Hangar's own client uses none of it.
		words = append(words, "-F", "/dev/null")
		words = append(words, sshBaseArgs()...)
		words = append(words,
			"-o", "IdentityFile="+key, "-o", "IdentitiesOnly=yes",
			"-o", "UserKnownHostsFile="+kh, "-o", "GlobalKnownHostsFile=/dev/null",
			"-o", "StrictHostKeyChecking=yes", "-o", "UpdateHostKeys=no")
	} else {
		words = append(words, sshBaseArgs()...)
	}
	if ep.HostKeyAlias != "" {
		words = append(words, "-o", "HostKeyAlias="+ep.HostKeyAlias)
	}
	if ep.Port != 0 {
		words = append(words, "-p", strconv.Itoa(ep.Port))
	}
	return rshJoin(words), nil
}

// sshConfigPath makes path absolute and writes it as an ssh_config value:
// ssh splits values at spaces unless quoted, expands %-tokens and ${VAR},
// and reads ~ as a home directory.
func sshConfigPath(path string) (string, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", err
	}
	if hasSpaceOrControl(strings.ReplaceAll(abs, " ", "")) || strings.Contains(abs, "${") {
		return "", fmt.Errorf("path %q holds control characters or \"${\", which ssh cannot be given", abs)
	}
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, "%", "%%")
	return `"` + r.Replace(abs) + `"`, nil
}

// rshJoin joins words into an rsync -e value. rsync splits that itself, not
// with a shell: a quote starts a quoted word, a doubled quote inside one is
// a literal quote, and there are no backslash escapes. So this is not
// shell.Quote, whose output rsync would read differently.
func rshJoin(words []string) string {
	quoted := make([]string, len(words))
	for i, w := range words {
		if w != "" && safeWord(strings.NewReplacer("/", "", "=", "", ",", "", "@", "").Replace(w)) {
			quoted[i] = w
			continue
		}
		quoted[i] = "'" + strings.ReplaceAll(w, "'", "''") + "'"
	}
	return strings.Join(quoted, " ")
}

// safeWord is a non-empty word of letters, digits and ._:- only.
func safeWord(s string) bool {
	if s == "" {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("._:-", r)) {
			return false
		}
	}
	return true
}

func hasSpaceOrControl(s string) bool {
	for _, r := range s {
		if r <= ' ' || r == 0x7f {
			return true
		}
	}
	return false
}

// rsyncEnv is this process's environment without what changes how rsync
// passes arguments or picks its remote shell behind our back.
func rsyncEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		switch name {
		case "RSYNC_OLD_ARGS", "RSYNC_PROTECT_ARGS", "RSYNC_RSH", "RSYNC_CONNECT_PROG":
			continue
		}
		env = append(env, kv)
	}
	return env
}

// quoteCommand renders a program and its arguments as a shell command
// line, for messages and for running it on a server.
func quoteCommand(program string, args []string) string {
	var b strings.Builder
	b.WriteString(program)
	for _, a := range args {
		b.WriteString(" ")
		b.WriteString(shell.Quote(a))
	}
	return b.String()
}

// lockedWriter serialises writes to w, which rsync's stdout and stderr
// share; nil stays nil.
func lockedWriter(w io.Writer) io.Writer {
	if w == nil {
		return nil
	}
	return &mutexWriter{w: w}
}

type mutexWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (m *mutexWriter) Write(p []byte) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.w.Write(p)
}

func orDefault(v, def int) int {
	if v == 0 {
		return def
	}
	return v
}

// RemoteRsync runs rsync on the server that src is connected to, copying
// srcPaths there to destPath on dest. The data goes from server to server.
// ssh on the source server logs in to dest with Hangar's key through agent
// forwarding, so the private key never leaves this machine; only signer is
// offered, and only while the copy runs. The source server trusts dest's
// host key only if it is one of destHostKeys, written to a file of its own
// that is removed afterwards. srcSudo runs the source's rsync with sudo
// (keeping SSH_AUTH_SOCK), dest.Sudo the destination's.
//
// When dest is the server src is connected to, rsync copies locally there.
// Paths, options and errors are as in Rsync; opts.KeyPath and
// opts.KnownHostsPath are not used.
func RemoteRsync(ctx context.Context, src *Client, srcSudo bool, srcPaths []string, dest Endpoint, destPath string, destHostKeys []ssh.PublicKey, signer ssh.Signer, opts RsyncOptions) error {
	to := Path{Host: &dest, Path: destPath}
	what := fmt.Sprintf("on %s from %q to %q", src.addr, srcPaths, to)
	if err := checkRemoteRsync(srcPaths, dest, destPath, opts); err != nil {
		return fmt.Errorf("rsync %s: %w", what, err)
	}
	srcArgs := make([]string, len(srcPaths))
	for i, p := range srcPaths {
		srcArgs[i] = rsyncArg(Path{Path: p}, true)
	}
	args := []string{"-a", "-s"}
	if sameAddr(src.addr, dest) {
		args = append(args, commonArgs(opts)...)
		local := destPath
		if local == "" {
			local = "." // the login directory, as "host:" would be
		}
		args = append(append(append(args, "--"), srcArgs...), rsyncArg(Path{Path: local}, false))
		return src.runRsync(ctx, opts, what, srcSudo || dest.Sudo, "", args, nil)
	}
	if len(destHostKeys) == 0 {
		return fmt.Errorf("rsync %s: no host key of %s given to trust", what, dest)
	}
	if signer == nil {
		return fmt.Errorf("rsync %s: no key to log in to %s with", what, dest)
	}

	alias := dest.HostKeyAlias
	if alias == "" {
		alias = dest.Host
	}
	var knownHosts strings.Builder
	for _, k := range destHostKeys {
		knownHosts.WriteString(knownhosts.Line([]string{alias}, k) + "\n")
	}
	dir, err := src.makeTempDir(ctx, "hangar-rsync", "known_hosts", knownHosts.String())
	if err != nil {
		return fmt.Errorf("rsync %s: writing the destination's host keys: %w", what, err)
	}
	defer src.removeTempDir(ctx, dir, opts.Log)

	rsh := append([]string{"ssh", "-F", "/dev/null"}, sshBaseArgs()...)
	rsh = append(rsh,
		"-o", "UserKnownHostsFile="+dir+"/known_hosts", "-o", "GlobalKnownHostsFile=/dev/null",
		"-o", "StrictHostKeyChecking=yes", "-o", "UpdateHostKeys=no",
		"-o", "HostKeyAlias="+alias, "-o", "PreferredAuthentications=publickey")
	if dest.Port != 0 {
		rsh = append(rsh, "-p", strconv.Itoa(dest.Port))
	}
	args = append(args, "-e", rshJoin(rsh))
	if dest.Sudo {
		args = append(args, "--rsync-path=sudo -n rsync")
	}
	args = append(args, commonArgs(opts)...)
	args = append(append(append(args, "--"), srcArgs...), rsyncArg(to, false))

	fwd, release, err := src.forwardAgent(signer)
	if err != nil {
		return fmt.Errorf("rsync %s: %w", what, err)
	}
	defer release()
	return src.runRsync(ctx, opts, what, srcSudo, "--preserve-env=SSH_AUTH_SOCK", args, fwd.request)
}

func checkRemoteRsync(srcPaths []string, dest Endpoint, destPath string, opts RsyncOptions) error {
	if len(srcPaths) == 0 {
		return errors.New("no sources")
	}
	for _, p := range srcPaths {
		if err := checkPath(Path{Path: p}); err != nil {
			return err
		}
	}
	if err := checkPath(Path{Host: &dest, Path: destPath}); err != nil {
		return err
	}
	return checkExtra(opts.Extra)
}

// sameAddr tells whether ep is the address a client is connected to.
func sameAddr(addr string, ep Endpoint) bool {
	return addr == net.JoinHostPort(ep.Host, strconv.Itoa(orDefault(ep.Port, 22)))
}

// runRsync runs rsync with args on the server, with sudo (and sudoFlags)
// when asked. setup prepares the session before the command starts.
func (c *Client) runRsync(ctx context.Context, opts RsyncOptions, what string, sudo bool, sudoFlags string, args []string, setup func(*ssh.Session) error) error {
	program := "rsync"
	if sudo {
		program = strings.TrimSpace("sudo -n "+sudoFlags) + " rsync"
	}
	line := quoteCommand(program, args)
	if opts.Log != nil {
		opts.Log.Debug("running rsync on a server", "server", c.addr, "copy", what, "command", line)
	}
	progress := lockedWriter(opts.Progress)
	err := c.runSession(ctx, line, progress, progress, setup)
	var exitErr *ExitError
	if errors.As(err, &exitErr) {
		re := &RsyncError{Command: line, Host: c.addr, Status: exitErr.Status, Stderr: exitErr.Stderr, Err: hostKeyError(exitErr.Stderr)}
		if exitErr.Signal != "" {
			re.Status = -1
		}
		err = re
	}
	if err != nil {
		return fmt.Errorf("rsync %s: %w", what, err)
	}
	return nil
}

// tempDirScript sets d to a fresh name for a private directory on a
// server, in $TMPDIR or /tmp. A TMPDIR that would need quoting is passed
// over: the name goes into rsync's -e, which has quoting rules of its own.
func tempDirScript(prefix string) string {
	return `t=${TMPDIR:-/tmp}; case $t in ''|*[!A-Za-z0-9/._-]*) t=/tmp;; esac; ` +
		"d=${t%/}/" + shell.Quote(prefix+"."+randomHex(8)) + "\n"
}

// makeTempDir makes a private directory on the server holding file with
// content, and returns its path.
func (c *Client) makeTempDir(ctx context.Context, prefix, file, content string) (string, error) {
	// mkdir, unlike a fixed name reused, fails on anything already there,
	// so no one else's file or link can stand in for ours.
	script := tempDirScript(prefix) +
		`umask 077 && mkdir "$d" && cat > "$d"/` + shell.Quote(file) + ` && printf '%s\n' "$d"`
	var out bytes.Buffer
	if err := c.Run(ctx, script, strings.NewReader(content), &out, nil); err != nil {
		return "", err
	}
	dir := strings.TrimSuffix(out.String(), "\n")
	if !strings.HasPrefix(dir, "/") || !safeWord(strings.ReplaceAll(dir, "/", "")) {
		return "", fmt.Errorf("the server made temporary directory %q, which is not a plain path", dir)
	}
	return dir, nil
}

// removeTempDir removes what makeTempDir made, even when ctx has ended.
func (c *Client) removeTempDir(ctx context.Context, dir string, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), killWait*5)
	defer cancel()
	if err := c.Run(ctx, "rm -rf -- "+shell.Quote(dir), nil, nil, nil); err != nil && log != nil {
		log.Warn("removing a temporary directory on a server", "server", c.addr, "dir", dir, "err", err)
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// runSession is Run without stdin, with setup applied to the session
// before the command starts (Run has no such hook; RemoteRsync needs one
// to ask for agent forwarding).
func (c *Client) runSession(ctx context.Context, cmd string, stdout, stderr io.Writer, setup func(*ssh.Session) error) error {
	if setup == nil {
		return c.Run(ctx, cmd, nil, stdout, stderr)
	}
	sess, err := c.conn.NewSession()
	if err != nil {
		return fmt.Errorf("opening ssh session on %s: %w", c.addr, err)
	}
	defer func() { _ = sess.Close() }()
	if err := setup(sess); err != nil {
		return fmt.Errorf("preparing ssh session on %s: %w", c.addr, err)
	}
	tail := &tailBuffer{max: stderrTail}
	out, errOut := &guardWriter{w: stdout}, &guardWriter{w: io.MultiWriter(tail, orDiscard(stderr))}
	defer out.close()
	defer errOut.close()
	pid := newPIDFilter(errOut)
	sess.Stdout = out
	sess.Stderr = pid
	if err := sess.Start(pidPrefix + cmd); err != nil {
		return fmt.Errorf("starting %q on %s: %w", cmd, c.addr, err)
	}
	waited := make(chan error, 1)
	go func() { waited <- sess.Wait() }()
	select {
	case err = <-waited:
	case <-ctx.Done():
		c.killCommand(sess, pid, killWait)
		return fmt.Errorf("running %q on %s: %w", cmd, c.addr, ctx.Err())
	}
	pid.flush()
	if ctxErr := ctx.Err(); ctxErr != nil {
		return fmt.Errorf("running %q on %s: %w", cmd, c.addr, ctxErr)
	}
	var exitErr *ssh.ExitError
	if errors.As(err, &exitErr) {
		return &ExitError{Command: cmd, Status: exitErr.ExitStatus(), Signal: exitErr.Signal(), Stderr: tail.String()}
	}
	if err != nil {
		return fmt.Errorf("running %q on %s: %w", cmd, c.addr, err)
	}
	return nil
}

// forwardedAgents holds the agent each connection forwards. x/crypto takes
// one handler for agent channels per connection, and sshd forwards an
// agent once per connection, to all its later sessions too. So concurrent
// and later copies on a connection share one agent, each adding its key
// while it runs.
var (
	forwardedAgentsMu sync.Mutex
	forwardedAgents   = map[*Client]*agentForwarding{}
)

type agentForwarding struct {
	agent *signerAgent
	// mu makes a session that does not ask for forwarding start only
	// after the one that asked has its answer.
	mu        sync.Mutex
	requested bool
}

// request asks sshd to forward the agent to sess, unless it already
// forwards it on this connection (then every session has it).
func (f *agentForwarding) request(sess *ssh.Session) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.requested {
		return nil
	}
	if err := agent.RequestAgentForwarding(sess); err != nil {
		return fmt.Errorf("asking for ssh agent forwarding (does the server's sshd_config allow it?): %w", err)
	}
	f.requested = true
	return nil
}

// forwardAgent serves signer to sessions on the connection that have the
// agent forwarded, until release is called.
func (c *Client) forwardAgent(signer ssh.Signer) (fwd *agentForwarding, release func(), err error) {
	forwardedAgentsMu.Lock()
	defer forwardedAgentsMu.Unlock()
	fwd = forwardedAgents[c]
	if fwd == nil {
		fwd = &agentForwarding{agent: &signerAgent{}}
		if err := agent.ForwardToAgent(c.conn, fwd.agent); err != nil {
			return nil, nil, fmt.Errorf("forwarding the ssh agent to %s: %w", c.addr, err)
		}
		forwardedAgents[c] = fwd
		go func() {
			_ = c.conn.Wait()
			forwardedAgentsMu.Lock()
			delete(forwardedAgents, c)
			forwardedAgentsMu.Unlock()
		}()
	}
	entry := &signer
	fwd.agent.add(entry)
	return fwd, sync.OnceFunc(func() { fwd.agent.remove(entry) }), nil
}

// signerAgent is an ssh agent holding signers, not private keys: Hangar's
// key stays an ssh.Signer. It only lists and signs; the server cannot add
// or remove keys.
type signerAgent struct {
	mu      sync.Mutex
	signers []*ssh.Signer // one entry per copy using it, so duplicates are normal
}

var errReadOnlyAgent = errors.New("agent: Hangar's forwarded agent only signs")

func (a *signerAgent) add(s *ssh.Signer) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.signers = append(a.signers, s)
}

func (a *signerAgent) remove(s *ssh.Signer) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for i, e := range a.signers {
		if e == s {
			a.signers = append(a.signers[:i], a.signers[i+1:]...)
			return
		}
	}
}

func (a *signerAgent) List() ([]*agent.Key, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	var keys []*agent.Key
	seen := map[string]bool{}
	for _, s := range a.signers {
		pub := (*s).PublicKey()
		blob := pub.Marshal()
		if seen[string(blob)] {
			continue
		}
		seen[string(blob)] = true
		keys = append(keys, &agent.Key{Format: pub.Type(), Blob: blob, Comment: "hangar"})
	}
	return keys, nil
}

func (a *signerAgent) Sign(key ssh.PublicKey, data []byte) (*ssh.Signature, error) {
	return a.SignWithFlags(key, data, 0)
}

func (a *signerAgent) SignWithFlags(key ssh.PublicKey, data []byte, flags agent.SignatureFlags) (*ssh.Signature, error) {
	s := a.find(key)
	if s == nil {
		return nil, errors.New("agent: no such key")
	}
	// RSA keys sign with SHA-2 when asked; OpenSSH asks.
	var algo string
	switch {
	case flags&agent.SignatureFlagRsaSha512 != 0:
		algo = ssh.KeyAlgoRSASHA512
	case flags&agent.SignatureFlagRsaSha256 != 0:
		algo = ssh.KeyAlgoRSASHA256
	}
	if as, ok := s.(ssh.AlgorithmSigner); ok && algo != "" {
		return as.SignWithAlgorithm(rand.Reader, data, algo)
	}
	return s.Sign(rand.Reader, data)
}

func (a *signerAgent) find(key ssh.PublicKey) ssh.Signer {
	a.mu.Lock()
	defer a.mu.Unlock()
	want := key.Marshal()
	for _, s := range a.signers {
		if bytes.Equal((*s).PublicKey().Marshal(), want) {
			return *s
		}
	}
	return nil
}

func (a *signerAgent) Signers() ([]ssh.Signer, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]ssh.Signer, len(a.signers))
	for i, s := range a.signers {
		out[i] = *s
	}
	return out, nil
}

func (a *signerAgent) Add(agent.AddedKey) error       { return errReadOnlyAgent }
func (a *signerAgent) Remove(ssh.PublicKey) error     { return errReadOnlyAgent }
func (a *signerAgent) RemoveAll() error               { return errReadOnlyAgent }
func (a *signerAgent) Lock(passphrase []byte) error   { return errReadOnlyAgent }
func (a *signerAgent) Unlock(passphrase []byte) error { return errReadOnlyAgent }

func (a *signerAgent) Extension(string, []byte) ([]byte, error) {
	return nil, agent.ErrExtensionUnsupported
}

var _ agent.ExtendedAgent = (*signerAgent)(nil)
