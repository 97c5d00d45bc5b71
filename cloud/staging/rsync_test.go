package staging_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/hangar-ci/hangar/cloud/staging"
	"github.com/hangar-ci/hangar/cloud/staging/sshtest"
	"github.com/hangar-ci/hangar/internal/testutil"
)

func needRsync(t testing.TB) {
	t.Helper()
	testutil.NeedTools(t, "apt-get install rsync openssh-client", "rsync", "ssh")
}

// needSudo skips tests of Sudo unless sudo lets this user run commands
// without a password, as on staging servers.
func needSudo(t testing.TB) {
	t.Helper()
	sudo := testutil.NeedTool(t, "sudo", "apt-get install sudo")
	// Installed but refusing without a password is this machine's policy,
	// not a missing tool: a skip even under HANGAR_REQUIRE_TOOLS.
	if err := exec.Command(sudo, "-n", "true").Run(); err != nil {
		t.Skipf("sudo -n does not work here: %v", err)
	}
}

func (e *testEnv) rsyncOptions() staging.RsyncOptions {
	return staging.RsyncOptions{KeyPath: e.keyPath, KnownHostsPath: e.kh.Path}
}

func (e *testEnv) endpoint() *staging.Endpoint {
	return &staging.Endpoint{User: e.srv.User(), Host: "127.0.0.1", Port: e.srv.Port()}
}

// remote is path on the test server, which is this machine.
func (e *testEnv) remote(path string) staging.Path {
	return staging.Path{Host: e.endpoint(), Path: path}
}

func localPath(path string) staging.Path { return staging.Path{Path: path} }

func locals(paths ...string) []staging.Path {
	out := make([]staging.Path, len(paths))
	for i, p := range paths {
		out[i] = localPath(p)
	}
	return out
}

// oddName is a file name that breaks naive quoting in every layer.
const oddName = "sp ace\nnew'line\"q\\ $(id) `id` *?[x]"

// makeCopyTree fills root with what a copy must keep: modes, symbolic links
// (relative and dangling), an empty directory, hard links, an awkward name
// and, when bigSize > 0, one large random file.
func makeCopyTree(t testing.TB, root string, bigSize int) {
	t.Helper()
	write := func(name string, data string, mode os.FileMode) {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), mode); err != nil {
			t.Fatal(err)
		}
		// WriteFile's mode passes through the umask.
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
	}
	write("run.sh", "#!/bin/sh\necho hi\n", 0o755)
	write("secret", "only for the owner\n", 0o600)
	write("plain.txt", "plain\n", 0o644)
	write("sub/deep/file", "deep\n", 0o640)
	write("private/x", "x\n", 0o644)
	write(oddName, "odd\n", 0o644)
	write("hard1", "linked twice\n", 0o644)
	must(t, os.Chmod(filepath.Join(root, "private"), 0o700))
	must(t, os.Mkdir(filepath.Join(root, "empty"), 0o755))
	must(t, os.Link(filepath.Join(root, "hard1"), filepath.Join(root, "hard2")))
	must(t, os.Symlink("deep/file", filepath.Join(root, "sub", "link")))
	must(t, os.Symlink("no/such/target", filepath.Join(root, "dangling")))
	if bigSize > 0 {
		data := make([]byte, bigSize)
		if _, err := rand.Read(data); err != nil {
			t.Fatal(err)
		}
		write("big", string(data), 0o644)
	}
	// A fixed time in the past, so a copy that lost times shows it.
	old := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	must(t, filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.Type()&fs.ModeSymlink != 0 {
			return err
		}
		return os.Chtimes(p, old, old)
	}))
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// treeEntry is what a copy must keep of one file.
type treeEntry struct {
	Mode     fs.FileMode
	UID, GID uint32
	Size     int64
	SHA256   string
	Link     string
	MTime    int64  // not kept for symbolic links
	LinkedTo string // for a hard link, the first path with its inode
}

// scanCopyTree describes every file under root but root itself.
func scanCopyTree(t testing.TB, root string) map[string]treeEntry {
	t.Helper()
	tree := map[string]treeEntry{}
	inodes := map[uint64]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == root {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		info, err := os.Lstat(p)
		if err != nil {
			return err
		}
		st := info.Sys().(*syscall.Stat_t)
		e := treeEntry{Mode: info.Mode(), UID: st.Uid, GID: st.Gid}
		switch {
		case info.Mode()&fs.ModeSymlink != 0:
			e.Link, err = os.Readlink(p)
		case info.Mode().IsRegular():
			e.Size, e.MTime = info.Size(), info.ModTime().Unix()
			var data []byte
			data, err = os.ReadFile(p)
			sum := sha256.Sum256(data)
			e.SHA256 = hex.EncodeToString(sum[:])
			if st.Nlink > 1 {
				if first, ok := inodes[st.Ino]; ok {
					e.LinkedTo = first
				} else {
					inodes[st.Ino] = rel
				}
			}
		default:
			e.MTime = info.ModTime().Unix()
		}
		tree[rel] = e
		return err
	})
	if err != nil {
		t.Fatalf("scanning %s: %v", root, err)
	}
	return tree
}

func assertSameTree(t testing.TB, want, got string) {
	t.Helper()
	w, g := scanCopyTree(t, want), scanCopyTree(t, got)
	for name, we := range w {
		ge, ok := g[name]
		if !ok {
			t.Errorf("%q is missing from the copy", name)
		} else if we != ge {
			t.Errorf("%q differs:\n  source %+v\n  copy   %+v", name, we, ge)
		}
	}
	for name := range g {
		if _, ok := w[name]; !ok {
			t.Errorf("the copy has %q, which the source has not", name)
		}
	}
}

// listTree lists the paths under root, directories with a trailing slash.
func listTree(t testing.TB, root string) []string {
	t.Helper()
	var names []string
	must(t, filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == root {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if d.IsDir() {
			rel += "/"
		}
		names = append(names, rel)
		return nil
	}))
	slices.Sort(names)
	return names
}

func TestRsyncPutGetRoundTrip(t *testing.T) {
	needRsync(t)
	e := newTestEnv(t)
	ctx := testContext(t)
	dir := t.TempDir()
	src, onServer, back := filepath.Join(dir, "src"), filepath.Join(dir, "on server"), filepath.Join(dir, "back")
	makeCopyTree(t, src, 64<<20)

	opts := e.rsyncOptions()
	opts.Extra = []string{"-H"}
	var progress bytes.Buffer
	opts.Progress = &progress
	opts.LiveProgress = true
	if err := staging.Rsync(ctx, opts, locals(src+"/"), e.remote(onServer)); err != nil {
		t.Fatalf("put: %v", err)
	}
	assertSameTree(t, src, onServer)
	if !strings.Contains(progress.String(), "to-chk=0/") {
		t.Errorf("progress output %q does not show the end", progress.String())
	}
	// Not a terminal: warnings only, no line rewritten with \r.
	progress.Reset()
	opts.LiveProgress = false
	if err := staging.Rsync(ctx, opts, locals(src+"/"), e.remote(filepath.Join(dir, "again"))); err != nil {
		t.Fatalf("put without live progress: %v", err)
	}
	if progress.Len() > 0 {
		t.Errorf("progress without LiveProgress: %q", progress.String())
	}

	opts.Progress = nil
	if err := staging.Rsync(ctx, opts, []staging.Path{e.remote(onServer + "/")}, localPath(back)); err != nil {
		t.Fatalf("get: %v", err)
	}
	assertSameTree(t, src, back)
	if got := scanCopyTree(t, back)["hard2"].LinkedTo; got != "hard1" {
		t.Errorf("hard2 is linked to %q, want hard1", got)
	}
}

func TestRsyncTrailingSlash(t *testing.T) {
	needRsync(t)
	e := newTestEnv(t)
	ctx := testContext(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "a")
	must(t, os.MkdirAll(filepath.Join(src, "in"), 0o755))
	must(t, os.WriteFile(filepath.Join(src, "in", "f"), []byte("f"), 0o644))

	for _, tc := range []struct {
		name, suffix string
		want         []string
	}{
		{"directory", "", []string{"a/", "a/in/", "a/in/f"}},
		{"contents", "/", []string{"in/", "in/f"}},
	} {
		for _, put := range []bool{true, false} {
			name := tc.name + map[bool]string{true: " put", false: " get"}[put]
			t.Run(name, func(t *testing.T) {
				dest := filepath.Join(dir, strings.ReplaceAll(name, " ", "-"))
				must(t, os.Mkdir(dest, 0o755))
				var err error
				if put {
					err = staging.Rsync(ctx, e.rsyncOptions(), locals(src+tc.suffix), e.remote(dest))
				} else {
					err = staging.Rsync(ctx, e.rsyncOptions(), []staging.Path{e.remote(src + tc.suffix)}, localPath(dest))
				}
				if err != nil {
					t.Fatal(err)
				}
				if got := listTree(t, dest); !reflect.DeepEqual(got, tc.want) {
					t.Errorf("copied %q, want %q", got, tc.want)
				}
			})
		}
	}
}

func TestRsyncSeveralSources(t *testing.T) {
	needRsync(t)
	e := newTestEnv(t)
	ctx := testContext(t)
	dir := t.TempDir()
	for _, f := range []string{"one", "two", "d/three"} {
		must(t, os.MkdirAll(filepath.Dir(filepath.Join(dir, "src", f)), 0o755))
		must(t, os.WriteFile(filepath.Join(dir, "src", f), []byte(f), 0o644))
	}
	src := func(name string) string { return filepath.Join(dir, "src", name) }

	put := filepath.Join(dir, "put")
	if err := staging.Rsync(ctx, e.rsyncOptions(), locals(src("one"), src("two"), src("d")), e.remote(put+"/")); err != nil {
		t.Fatal(err)
	}
	if got, want := listTree(t, put), []string{"d/", "d/three", "one", "two"}; !reflect.DeepEqual(got, want) {
		t.Errorf("put copied %q, want %q", got, want)
	}

	get := filepath.Join(dir, "get")
	if err := staging.Rsync(ctx, e.rsyncOptions(), []staging.Path{e.remote(src("two")), e.remote(src("d") + "/")}, localPath(get)); err != nil {
		t.Fatal(err)
	}
	if got, want := listTree(t, get), []string{"three", "two"}; !reflect.DeepEqual(got, want) {
		t.Errorf("get copied %q, want %q", got, want)
	}
}

func TestRsyncExtraAndDelete(t *testing.T) {
	needRsync(t)
	e := newTestEnv(t)
	ctx := testContext(t)
	dir := t.TempDir()
	src, dest := filepath.Join(dir, "src"), filepath.Join(dir, "dest")
	for _, f := range []string{"keep.txt", "skip.log", "sub/also.log", "sub/keep"} {
		must(t, os.MkdirAll(filepath.Dir(filepath.Join(src, f)), 0o755))
		must(t, os.WriteFile(filepath.Join(src, f), []byte(f), 0o644))
	}
	must(t, os.MkdirAll(dest, 0o755))
	must(t, os.WriteFile(filepath.Join(dest, "stale"), nil, 0o644))

	opts := e.rsyncOptions()
	opts.Extra = []string{"--exclude=*.log"}
	if err := staging.Rsync(ctx, opts, locals(src+"/"), e.remote(dest)); err != nil {
		t.Fatal(err)
	}
	if got, want := listTree(t, dest), []string{"keep.txt", "stale", "sub/", "sub/keep"}; !reflect.DeepEqual(got, want) {
		t.Errorf("with --exclude: %q, want %q", got, want)
	}
	opts.Delete = true
	if err := staging.Rsync(ctx, opts, locals(src+"/"), e.remote(dest)); err != nil {
		t.Fatal(err)
	}
	if got, want := listTree(t, dest), []string{"keep.txt", "sub/", "sub/keep"}; !reflect.DeepEqual(got, want) {
		t.Errorf("with Delete: %q, want %q", got, want)
	}
}

func TestRsyncRefusesHostKey(t *testing.T) {
	needRsync(t)
	e := newTestEnv(t)
	other := sshtest.Start(t)
	src := filepath.Join(t.TempDir(), "f")
	must(t, os.WriteFile(src, []byte("x"), 0o644))

	for _, tc := range []struct {
		name string
		pin  ssh.PublicKey // nil: pin nothing
		want error
		text string
	}{
		{"changed", other.HostKey(), staging.ErrHostKeyChanged, "REMOTE HOST IDENTIFICATION HAS CHANGED"},
		{"unknown", nil, staging.ErrUnknownHost, "Host key verification failed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kh := &staging.KnownHosts{Path: filepath.Join(t.TempDir(), "known_hosts")}
			must(t, os.WriteFile(kh.Path, nil, 0o600))
			if tc.pin != nil {
				must(t, kh.Pin(e.srv.Addr(), tc.pin))
			}
			opts := staging.RsyncOptions{KeyPath: e.keyPath, KnownHostsPath: kh.Path}
			dest := filepath.Join(t.TempDir(), "dest")
			err := staging.Rsync(testContext(t), opts, locals(src), e.remote(dest))
			var rerr *staging.RsyncError
			if !errors.As(err, &rerr) || !sshFailed(rerr.Status) || !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want an RsyncError with status 255 or 12 and %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), "host key") || !strings.Contains(rerr.Stderr, tc.text) {
				t.Errorf("error does not explain the host key:\n%v", err)
			}
			if _, err := os.Stat(dest); err == nil {
				t.Error("rsync copied to a server it should not trust")
			}
		})
	}
}

func TestRsyncHostKeyAlias(t *testing.T) {
	needRsync(t)
	e := newTestEnv(t)
	// Pinned under the instance id only, as the manager pins servers.
	kh := &staging.KnownHosts{Path: filepath.Join(t.TempDir(), "known_hosts")}
	must(t, kh.Pin("i-0123456789abcdef0", e.srv.HostKey()))
	opts := staging.RsyncOptions{KeyPath: e.keyPath, KnownHostsPath: kh.Path}
	src := filepath.Join(t.TempDir(), "f")
	must(t, os.WriteFile(src, []byte("x"), 0o644))
	dest := filepath.Join(t.TempDir(), "dest")

	ep := e.endpoint()
	if err := staging.Rsync(testContext(t), opts, locals(src), staging.Path{Host: ep, Path: dest}); !errors.Is(err, staging.ErrUnknownHost) {
		t.Errorf("without the alias: got %v, want ErrUnknownHost", err)
	}
	ep.HostKeyAlias = "i-0123456789abcdef0"
	if err := staging.Rsync(testContext(t), opts, locals(src), staging.Path{Host: ep, Path: dest}); err != nil {
		t.Fatalf("with the alias: %v", err)
	}
	if _, err := os.Stat(dest); err != nil {
		t.Error(err)
	}
}

func TestRsyncUnreachable(t *testing.T) {
	needRsync(t)
	e := newTestEnv(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	_ = l.Close()
	ep := e.endpoint()
	ep.Port = port
	err = staging.Rsync(testContext(t), e.rsyncOptions(), []staging.Path{{Host: ep, Path: "/x"}}, localPath(t.TempDir()))
	var rerr *staging.RsyncError
	if !errors.As(err, &rerr) || !sshFailed(rerr.Status) || !strings.Contains(rerr.Stderr, "Connection refused") {
		t.Fatalf("got %v, want an RsyncError with status 255 or 12 and ssh's reason", err)
	}
	if !strings.Contains(err.Error(), "port "+strconv.Itoa(port)) || !strings.Contains(err.Error(), "Connection refused") {
		t.Errorf("error does not say where and what failed: %v", err)
	}
}

func TestRsyncMissingSource(t *testing.T) {
	needRsync(t)
	e := newTestEnv(t)
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing")
	for _, tc := range []struct {
		name string
		src  staging.Path
		dest staging.Path
	}{
		{"local", localPath(missing), e.remote(filepath.Join(dir, "d1"))},
		{"remote", e.remote(missing), localPath(filepath.Join(dir, "d2"))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := staging.Rsync(testContext(t), e.rsyncOptions(), []staging.Path{tc.src}, tc.dest)
			var rerr *staging.RsyncError
			if !errors.As(err, &rerr) || rerr.Status != 23 {
				t.Fatalf("got %v, want an RsyncError with status 23", err)
			}
			if !strings.Contains(rerr.Stderr, "No such file or directory") || !strings.Contains(rerr.Command, "rsync ") ||
				!strings.Contains(err.Error(), "partial transfer due to error") || !strings.Contains(err.Error(), missing) {
				t.Errorf("error lacks rsync's reason, the command or the path: %v\ncommand: %s", err, rerr.Command)
			}
		})
	}
}

func TestRsyncCancel(t *testing.T) {
	needRsync(t)
	e := newTestEnv(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	must(t, os.WriteFile(src, make([]byte, 4<<20), 0o644))
	dest := filepath.Join(dir, "dest-"+strconv.FormatInt(time.Now().UnixNano(), 36))
	must(t, os.Mkdir(dest, 0o755))

	// At 1 KiB/s the copy would take over an hour; it is cancelled once
	// the transfer is under way.
	opts := e.rsyncOptions()
	opts.Extra = []string{"--bwlimit=1"}
	opts.LiveProgress = true // its progress line says the transfer is under way
	started := make(chan struct{}, 1)
	opts.Progress = writerFunc(func(p []byte) (int, error) {
		select {
		case started <- struct{}{}:
		default:
		}
		return len(p), nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- staging.Rsync(ctx, opts, locals(src), e.remote(dest+"/")) }()
	select {
	case <-started:
	case err := <-errc:
		t.Fatalf("rsync ended before it was cancelled: %v", err)
	}
	cancel()
	err := <-errc
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	// Our rsync and ssh are gone when Rsync returns; the server's rsync
	// follows once it sees the connection closed.
	if pids := processesMentioning(t, dest); len(pids) > 0 {
		t.Errorf("processes %v still run after Rsync returned", pids)
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(processesIn(t, dest)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the server's rsync still runs in %s", dest)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// sshFailed tells whether status is rsync's for a failed ssh: 255 (ssh's
// own) or 12 (the stream ended), depending on which process noticed first.
func sshFailed(status int) bool { return status == 255 || status == 12 }

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// processesMentioning lists the processes whose command line holds s.
func processesMentioning(t testing.TB, s string) []string {
	t.Helper()
	var pids []string
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		if b, err := os.ReadFile(d + "/cmdline"); err == nil && bytes.Contains(b, []byte(s)) {
			pids = append(pids, filepath.Base(d)+": "+strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	return pids
}

// processesIn lists the processes whose working directory is dir.
func processesIn(t testing.TB, dir string) []string {
	t.Helper()
	var pids []string
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		if cwd, err := os.Readlink(d + "/cwd"); err == nil && cwd == dir {
			pids = append(pids, filepath.Base(d))
		}
	}
	return pids
}

// hostileNames are file names that a shell would run or expand, that rsync
// could take for options or hosts, or that a remote rsync would glob.
var hostileNames = []string{
	"x; touch INJECTED",
	"$(touch INJECTED)",
	"`touch INJECTED`",
	"-rf",
	"--delete",
	"c:d",
	"a*",
	"q?",
	"[ab]",
	`back\slash`,
	"new\nline",
	"it's \"quoted\"",
	"~",
}

func TestRsyncHostilePaths(t *testing.T) {
	needRsync(t)
	e := newTestEnv(t)
	ctx := testContext(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	must(t, os.Mkdir(src, 0o755))
	// Decoys that wildcards in the names would match.
	for _, name := range append(slices.Clone(hostileNames), "abc", "qq", "a", "b") {
		must(t, os.WriteFile(filepath.Join(src, name), []byte(name), 0o644))
	}
	// Relative local paths are the ones rsync could misread.
	t.Chdir(src)

	// All names in one copy each way: a name misread would show as a
	// missing, extra or renamed file.
	put, get := filepath.Join(dir, "put"), filepath.Join(dir, "get")
	must(t, os.Mkdir(put, 0o755))
	must(t, os.Mkdir(get, 0o755))
	if err := staging.Rsync(ctx, e.rsyncOptions(), locals(hostileNames...), e.remote(put+"/")); err != nil {
		t.Errorf("put: %v", err)
	}
	var remotes []staging.Path
	for _, name := range hostileNames {
		remotes = append(remotes, e.remote(filepath.Join(src, name)))
	}
	if err := staging.Rsync(ctx, e.rsyncOptions(), remotes, localPath(get+"/")); err != nil {
		t.Errorf("get: %v", err)
	}
	want := slices.Sorted(slices.Values(hostileNames))
	for _, d := range []string{put, get} {
		if got := listTree(t, d); !reflect.DeepEqual(got, want) {
			t.Errorf("%s holds %q, want %q", filepath.Base(d), got, want)
		}
	}
	// And as names of a remote destination, one copy each.
	dests := filepath.Join(dir, "dests")
	must(t, os.Mkdir(dests, 0o755))
	for _, name := range []string{"x; touch INJECTED", "$(touch INJECTED)", "-rf", "a*"} {
		if err := staging.Rsync(ctx, e.rsyncOptions(), locals("abc"), e.remote(filepath.Join(dests, name))); err != nil {
			t.Errorf("put to %q: %v", name, err)
		}
	}
	if got, want := listTree(t, dests), []string{"$(touch INJECTED)", "-rf", "a*", "x; touch INJECTED"}; !reflect.DeepEqual(got, want) {
		t.Errorf("copies to hostile names made %q, want %q", got, want)
	}
	for _, where := range []string{src, dir, os.Getenv("HOME")} {
		if _, err := os.Lstat(filepath.Join(where, "INJECTED")); err == nil {
			t.Errorf("a name was run as a command: %s/INJECTED exists", where)
		}
	}
}

func TestRsyncOddKeyPath(t *testing.T) {
	needRsync(t)
	e := newTestEnv(t)
	// Key and known_hosts where rsync's -e splitting, ssh's option
	// parsing and its %-tokens would all break an unquoted path.
	odd := filepath.Join(t.TempDir(), `it's a "key" 100% dir`)
	_, pub, keyPath, err := staging.LoadOrCreateKey(odd, "odd")
	if err != nil {
		t.Fatal(err)
	}
	e.srv.AuthorizeKey(pub)
	kh := &staging.KnownHosts{Path: filepath.Join(odd, "known hosts")}
	must(t, kh.Pin(e.srv.Addr(), e.srv.HostKey()))
	src := filepath.Join(t.TempDir(), "f")
	must(t, os.WriteFile(src, []byte("x"), 0o644))
	dest := filepath.Join(t.TempDir(), "dest")
	opts := staging.RsyncOptions{KeyPath: keyPath, KnownHostsPath: kh.Path}
	if err := staging.Rsync(testContext(t), opts, locals(src), e.remote(dest)); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(dest); err != nil || string(b) != "x" {
		t.Errorf("copied %q, %v", b, err)
	}
}

func TestRsyncSudo(t *testing.T) {
	needRsync(t)
	needSudo(t)
	e := newTestEnv(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	makeCopyTree(t, src, 0)
	ep := e.endpoint()
	ep.Sudo = true
	dest := filepath.Join(dir, "dest")
	opts := e.rsyncOptions()
	opts.Extra = []string{"-H"}
	if err := staging.Rsync(testContext(t), opts, locals(src+"/"), staging.Path{Host: ep, Path: dest}); err != nil {
		t.Fatal(err)
	}
	assertSameTree(t, src, dest)
}

func TestRsyncBadInput(t *testing.T) {
	e := &staging.Endpoint{User: "root", Host: "127.0.0.1", Port: 22}
	other := &staging.Endpoint{User: "root", Host: "127.0.0.2"}
	ok := staging.RsyncOptions{KeyPath: "/k", KnownHostsPath: "/kh"}
	with := func(f func(*staging.Endpoint)) *staging.Endpoint {
		c := *e
		f(&c)
		return &c
	}
	for _, tc := range []struct {
		name    string
		opts    staging.RsyncOptions
		sources []staging.Path
		dest    staging.Path
		want    string
	}{
		{"no sources", ok, nil, localPath("/d"), "no sources"},
		{"both remote", ok, []staging.Path{{Host: e, Path: "/a"}}, staging.Path{Host: other, Path: "/b"}, "both sides are remote"},
		{"sources on two hosts", ok, []staging.Path{{Host: e, Path: "/a"}, {Host: other, Path: "/b"}}, localPath("/d"), "different hosts"},
		{"local and remote sources", ok, []staging.Path{localPath("/a"), {Host: e, Path: "/b"}}, localPath("/d"), "different hosts"},
		{"empty local path", ok, locals(""), staging.Path{Host: e, Path: "/d"}, "empty local path"},
		{"host like an option", ok, locals("/a"), staging.Path{Host: with(func(e *staging.Endpoint) { e.Host = "-oProxyCommand=x" }), Path: "/d"}, `host "-oProxyCommand=x" starts with '-'`},
		{"host with a user", ok, locals("/a"), staging.Path{Host: with(func(e *staging.Endpoint) { e.Host = "x@y" }), Path: "/d"}, "is not a host name"},
		{"host with space", ok, locals("/a"), staging.Path{Host: with(func(e *staging.Endpoint) { e.Host = "a b" }), Path: "/d"}, "spaces"},
		{"no host", ok, locals("/a"), staging.Path{Host: with(func(e *staging.Endpoint) { e.Host = "" }), Path: "/d"}, "no host"},
		{"user with space", ok, locals("/a"), staging.Path{Host: with(func(e *staging.Endpoint) { e.User = "a b" }), Path: "/d"}, "is not a user name"},
		{"bad port", ok, locals("/a"), staging.Path{Host: with(func(e *staging.Endpoint) { e.Port = 70000 }), Path: "/d"}, "port 70000 out of range"},
		{"bad alias", ok, locals("/a"), staging.Path{Host: with(func(e *staging.Endpoint) { e.HostKeyAlias = "a b" }), Path: "/d"}, "host key alias"},
		{"key without pins", staging.RsyncOptions{KeyPath: "/k"}, locals("/a"), staging.Path{Host: e, Path: "/d"}, "go together"},
		{"double dash in extra", staging.RsyncOptions{Extra: []string{"--"}}, locals("/a"), localPath("/d"), `hold "--"`},
		{"NUL in path", ok, locals("/a\x00b"), localPath("/d"), "NUL"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := staging.Rsync(context.Background(), tc.opts, tc.sources, tc.dest)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

func TestRsyncLocalToLocal(t *testing.T) {
	needRsync(t)
	dir := t.TempDir()
	src, dest := filepath.Join(dir, "src"), filepath.Join(dir, "dest")
	makeCopyTree(t, src, 1<<20)
	if err := staging.Rsync(testContext(t), staging.RsyncOptions{Extra: []string{"-H"}}, locals(src+"/"), localPath(dest)); err != nil {
		t.Fatal(err)
	}
	assertSameTree(t, src, dest)
}

// twoServers is a source and a destination server that trust the same key,
// each with its own host key.
func twoServers(t *testing.T) (src, dst *testEnv) {
	src = newTestEnv(t)
	dst = &testEnv{srv: sshtest.Start(t), signer: src.signer, keyPath: src.keyPath, kh: src.kh}
	pub := ssh.MarshalAuthorizedKey(src.signer.PublicKey())
	dst.srv.AuthorizeKey(pub)
	must(t, src.kh.Pin(dst.srv.Addr(), dst.srv.HostKey()))
	return src, dst
}

func TestRemoteRsync(t *testing.T) {
	needRsync(t)
	srcEnv, dstEnv := twoServers(t)
	c := srcEnv.dial(t)
	ctx := testContext(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	makeCopyTree(t, src, 8<<20)

	dest := staging.Endpoint{User: dstEnv.srv.User(), Host: "127.0.0.1", Port: dstEnv.srv.Port(), HostKeyAlias: "i-0dest"}
	keys := []ssh.PublicKey{dstEnv.srv.HostKey()}
	opts := staging.RsyncOptions{Extra: []string{"-H"}, LiveProgress: true}
	var progress bytes.Buffer
	opts.Progress = &progress
	if err := staging.RemoteRsync(ctx, c, false, []string{src + "/"}, dest, filepath.Join(dir, "copy"), keys, srcEnv.signer, opts); err != nil {
		t.Fatalf("copy between servers: %v", err)
	}
	assertSameTree(t, src, filepath.Join(dir, "copy"))
	if !strings.Contains(progress.String(), "to-chk=0/") {
		t.Errorf("progress %q does not show the end", progress.String())
	}

	// Several sources, trailing-slash rules, and the same connection again
	// (its agent forwarding is set up once).
	if err := staging.RemoteRsync(ctx, c, false, []string{filepath.Join(src, "sub"), filepath.Join(src, "plain.txt")}, dest, filepath.Join(dir, "two"), keys, srcEnv.signer, staging.RsyncOptions{}); err != nil {
		t.Fatal(err)
	}
	if got, want := listTree(t, filepath.Join(dir, "two")), []string{"plain.txt", "sub/", "sub/deep/", "sub/deep/file", "sub/link"}; !reflect.DeepEqual(got, want) {
		t.Errorf("copied %q, want %q", got, want)
	}

	// The known_hosts file made on the source server is gone.
	if left := listTree(t, srcEnv.srv.TempDir()); len(left) > 0 {
		t.Errorf("the source server keeps %q", left)
	}
}

func TestRemoteRsyncRefusesHostKey(t *testing.T) {
	needRsync(t)
	srcEnv, dstEnv := twoServers(t)
	c := srcEnv.dial(t)
	dir := t.TempDir()
	must(t, os.WriteFile(filepath.Join(dir, "f"), []byte("x"), 0o644))
	dest := staging.Endpoint{User: dstEnv.srv.User(), Host: "127.0.0.1", Port: dstEnv.srv.Port(), HostKeyAlias: "i-0dest"}
	// The source server's own key stands for a destination that changed.
	wrong := []ssh.PublicKey{srcEnv.srv.HostKey()}
	err := staging.RemoteRsync(testContext(t), c, false, []string{filepath.Join(dir, "f")}, dest, filepath.Join(dir, "copy"), wrong, srcEnv.signer, staging.RsyncOptions{})
	var rerr *staging.RsyncError
	if !errors.As(err, &rerr) || !errors.Is(err, staging.ErrHostKeyChanged) || !sshFailed(rerr.Status) || rerr.Host != srcEnv.srv.Addr() {
		t.Fatalf("got %v, want an RsyncError on the source with status 255 or 12 and ErrHostKeyChanged", err)
	}
	if !strings.Contains(rerr.Stderr, "i-0dest") {
		t.Errorf("ssh's message does not name the destination: %s", rerr.Stderr)
	}
	if _, err := os.Stat(filepath.Join(dir, "copy")); err == nil {
		t.Error("the copy went to a server with the wrong host key")
	}
	if left := listTree(t, srcEnv.srv.TempDir()); len(left) > 0 {
		t.Errorf("the source server keeps %q", left)
	}

	// Without the agent's key the hop cannot log in: the key really is
	// what forwarding provides.
	stranger, _, _, err := staging.LoadOrCreateKey(t.TempDir(), "stranger")
	if err != nil {
		t.Fatal(err)
	}
	keys := []ssh.PublicKey{dstEnv.srv.HostKey()}
	err = staging.RemoteRsync(testContext(t), c, false, []string{filepath.Join(dir, "f")}, dest, filepath.Join(dir, "copy"), keys, stranger, staging.RsyncOptions{})
	if !errors.As(err, &rerr) || !sshFailed(rerr.Status) || !strings.Contains(rerr.Stderr, "Permission denied") {
		t.Errorf("with a key the destination does not trust: got %v, want ssh's permission denied", err)
	}
}

func TestRemoteRsyncSameServer(t *testing.T) {
	needRsync(t)
	e := newTestEnv(t)
	c := e.dial(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	makeCopyTree(t, src, 0)
	dest := staging.Endpoint{User: e.srv.User(), Host: "127.0.0.1", Port: e.srv.Port()}
	// No host keys and no signer: none are needed on one server.
	if err := staging.RemoteRsync(testContext(t), c, false, []string{src + "/"}, dest, filepath.Join(dir, "copy"), nil, nil, staging.RsyncOptions{Extra: []string{"-H"}}); err != nil {
		t.Fatal(err)
	}
	assertSameTree(t, src, filepath.Join(dir, "copy"))
}

func TestRemoteRsyncSudo(t *testing.T) {
	needRsync(t)
	needSudo(t)
	srcEnv, dstEnv := twoServers(t)
	c := srcEnv.dial(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	makeCopyTree(t, src, 0)
	dest := staging.Endpoint{User: dstEnv.srv.User(), Host: "127.0.0.1", Port: dstEnv.srv.Port(), Sudo: true}
	keys := []ssh.PublicKey{dstEnv.srv.HostKey()}
	if err := staging.RemoteRsync(testContext(t), c, true, []string{src + "/"}, dest, filepath.Join(dir, "copy"), keys, srcEnv.signer, staging.RsyncOptions{Extra: []string{"-H"}}); err != nil {
		t.Fatal(err)
	}
	assertSameTree(t, src, filepath.Join(dir, "copy"))
}

func TestRemoteRsyncCancel(t *testing.T) {
	needRsync(t)
	srcEnv, dstEnv := twoServers(t)
	c := srcEnv.dial(t)
	dir := t.TempDir()
	must(t, os.WriteFile(filepath.Join(dir, "f"), make([]byte, 4<<20), 0o644))
	dest := staging.Endpoint{User: dstEnv.srv.User(), Host: "127.0.0.1", Port: dstEnv.srv.Port()}
	keys := []ssh.PublicKey{dstEnv.srv.HostKey()}
	started := make(chan struct{}, 1)
	opts := staging.RsyncOptions{Extra: []string{"--bwlimit=1"}, LiveProgress: true, Progress: writerFunc(func(p []byte) (int, error) {
		select {
		case started <- struct{}{}:
		default:
		}
		return len(p), nil
	})}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		errc <- staging.RemoteRsync(ctx, c, false, []string{filepath.Join(dir, "f")}, dest, filepath.Join(dir, "copy"), keys, srcEnv.signer, opts)
	}()
	select {
	case <-started:
	case err := <-errc:
		t.Fatalf("rsync ended before it was cancelled: %v", err)
	}
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	if left := listTree(t, srcEnv.srv.TempDir()); len(left) > 0 {
		t.Errorf("the source server keeps %q after cancelling", left)
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(processesMentioning(t, "--bwlimit=1")) > 0 || len(processesIn(t, dir)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("rsync still runs after cancelling: %v", processesMentioning(t, "--bwlimit=1"))
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The connection still works.
	if out, err := c.Output(testContext(t), "echo alive"); err != nil || string(out) != "alive\n" {
		t.Errorf("after cancelling: %q, %v", out, err)
	}
}
