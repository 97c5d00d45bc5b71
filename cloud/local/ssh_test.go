package local

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/staging"
	"github.com/hangar-ci/hangar/internal/testutil"
)

const (
	keysBegin = "-----BEGIN SSH HOST KEY KEYS-----"
	keysEnd   = "-----END SSH HOST KEY KEYS-----"
)

func needSSHD(t *testing.T) {
	t.Helper()
	if err := checkSSHD(); err != nil {
		testutil.ToolMissing(t, "%v", err)
	}
}

func newTestKey(t *testing.T) (ssh.Signer, []byte, string) {
	t.Helper()
	signer, pub, path, err := staging.LoadOrCreateKey(t.TempDir(), "test")
	if err != nil {
		t.Fatal(err)
	}
	return signer, pub, path
}

// hostKeyBlocks returns the keys of every cloud-init host key block in the
// console, in order, and fails the test on a malformed one.
func hostKeyBlocks(t *testing.T, console string) [][]ssh.PublicKey {
	t.Helper()
	var blocks [][]ssh.PublicKey
	var cur []ssh.PublicKey
	in := false
	sc := bufio.NewScanner(strings.NewReader(console))
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == keysBegin:
			in, cur = true, nil
		case line == keysEnd:
			if !in {
				t.Fatalf("console has an end of host keys without a beginning:\n%s", console)
			}
			in = false
			blocks = append(blocks, cur)
		case in:
			k, _, _, rest, err := ssh.ParseAuthorizedKey([]byte(line))
			if err != nil || len(rest) != 0 {
				t.Fatalf("console host key line %q: %v", line, err)
			}
			cur = append(cur, k)
		}
	}
	return blocks
}

// dialInstance waits for the n-th host key block of the instance, pins its
// key and logs in.
func dialInstance(t *testing.T, p *Provider, in cloud.Instance, signer ssh.Signer, n int) (*staging.Client, ssh.PublicKey) {
	t.Helper()
	var blocks [][]ssh.PublicKey
	ready := func() bool {
		out, err := p.ConsoleOutput(t.Context(), in.ID)
		if err != nil {
			t.Fatal(err)
		}
		blocks = hostKeyBlocks(t, string(out))
		return len(blocks) >= n
	}
	waitUntil(t, "host key block "+strconv.Itoa(n), ready)
	if len(blocks[n-1]) != 1 || blocks[n-1][0].Type() != ssh.KeyAlgoED25519 {
		t.Fatalf("host key block %d = %v, want one ed25519 key", n, blocks[n-1])
	}
	key := blocks[n-1][0]
	kh := &staging.KnownHosts{Path: filepath.Join(t.TempDir(), "known_hosts")}
	addr := net.JoinHostPort(in.PrivateIP, strconv.Itoa(p.Capabilities().SSHPort))
	if err := kh.Pin(addr, key); err != nil {
		t.Fatal(err)
	}
	u, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	// The key is printed once sshd listens, so the first dial must work.
	c, err := staging.Dial(t.Context(), addr, u.Username, signer, kh)
	if err != nil {
		t.Fatalf("ssh to %s: %v", addr, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c, key
}

func waitUntil(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("waited %s for %s", waitFor, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func output(t *testing.T, c *staging.Client, cmd string) string {
	t.Helper()
	out, err := c.Output(t.Context(), cmd)
	if err != nil {
		t.Fatalf("ssh %q: %v", cmd, err)
	}
	return string(out)
}

func alive(pid int) bool {
	st, err := readStat(pid)
	return err == nil && st.state != 'Z' && st.state != 'X'
}

func TestSSH(t *testing.T) {
	needSSHD(t)
	p := newTestProvider(t, Options{})
	ctx := t.Context()
	signer, pub, _ := newTestKey(t)
	if err := p.ImportKeyPair(ctx, "test-key", pub); err != nil {
		t.Fatal(err)
	}
	if got := p.Capabilities().SSHPort; got != 2222 {
		t.Errorf("SSHPort = %d, want 2222", got)
	}
	spec := launchSpec("#!/bin/bash\necho \"user-data root=$HANGAR_ROOT\"\n", nil)
	spec.KeyName = "test-key"
	insts, err := p.Launch(ctx, spec, 1)
	if err != nil {
		t.Fatal(err)
	}
	in := insts[0]
	disk := filepath.Join(p.store.instanceDir(in.ID), "disk")

	// The host key block comes before the user-data's output, as
	// cloud-init prints it before user scripts run.
	out := waitConsole(t, p, in.ID, "user-data root=")
	begin, end, ud := strings.Index(out, keysBegin+"\n"), strings.Index(out, keysEnd+"\n"), strings.Index(out, "user-data root="+disk+"\n")
	if begin < 0 || end < begin || ud < end {
		t.Errorf("console lacks the host key block before the user-data's output:\n%s", out)
	}
	c, key := dialInstance(t, p, in, signer, 1)
	hostPub, err := os.ReadFile(filepath.Join(p.store.instanceDir(in.ID), "ssh", "ssh_host_ed25519_key.pub"))
	if err != nil {
		t.Fatal(err)
	}
	if want, _, _, _, err := ssh.ParseAuthorizedKey(hostPub); err != nil || !bytes.Equal(want.Marshal(), key.Marshal()) {
		t.Errorf("console shows host key %s, sshd has %s (%v)", ssh.FingerprintSHA256(key), hostPub, err)
	}

	u, _ := user.Current()
	got := output(t, c, `printf '%s\n%s\n' "$HANGAR_LOCAL_INSTANCE_ID" "$HANGAR_ROOT"; id -un`)
	if want := in.ID + "\n" + disk + "\n" + u.Username + "\n"; got != want {
		t.Errorf("ssh session sees %q, want marker, root and user %q", got, want)
	}

	v, err := p.CreateVolume(ctx, cloud.VolumeSpec{SizeGB: 1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.AttachVolume(ctx, v.ID, in.ID, "/dev/sdf"); err != nil {
		t.Fatal(err)
	}
	target := output(t, c, `echo over-ssh > "$HANGAR_ROOT/dev/sdf/hello" && readlink "$HANGAR_ROOT/dev/sdf"`)
	data := filepath.Join(p.store.volumeDir(v.ID), "data")
	if target != data+"\n" {
		t.Errorf("$HANGAR_ROOT/dev/sdf links to %q over ssh, want %s", target, data)
	}
	if b, err := os.ReadFile(filepath.Join(data, "hello")); err != nil || string(b) != "over-ssh\n" {
		t.Errorf("file written over ssh into the volume: %q, %v", b, err)
	}

	// Stop ends sshd and every session's processes, even those that left
	// the session.
	startSleep := func(c *staging.Client) int {
		t.Helper()
		s := output(t, c, `sleep 600 </dev/null >/dev/null 2>&1 & echo $!`)
		pid, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || !alive(pid) {
			t.Fatalf("starting sleep over ssh: %q, %v", s, err)
		}
		return pid
	}
	sleepPID := startSleep(c)
	sshdPID := readPID(t, filepath.Join(p.store.instanceDir(in.ID), "ssh", "sshd.pid"))
	if _, err := p.Stop(ctx, []string{in.ID}); err != nil {
		t.Fatal(err)
	}
	if alive(sleepPID) || alive(sshdPID) {
		t.Errorf("after Stop: sleep started over ssh alive %v, sshd alive %v", alive(sleepPID), alive(sshdPID))
	}
	if pids := markedProcs(t, in.ID); len(pids) > 0 {
		t.Errorf("processes %v survived Stop", pids)
	}
	if _, err := c.Output(ctx, "true"); err == nil {
		t.Error("the ssh connection made before Stop still works")
	}

	// Start boots sshd again, with the same host key, before the user-data.
	if _, err := p.Start(ctx, []string{in.ID}); err != nil {
		t.Fatal(err)
	}
	c2, key2 := dialInstance(t, p, in, signer, 2)
	if !bytes.Equal(key.Marshal(), key2.Marshal()) {
		t.Errorf("host key changed across Stop and Start")
	}
	sleepPID = startSleep(c2)
	if _, err := p.Terminate(ctx, []string{in.ID}); err != nil {
		t.Fatal(err)
	}
	if alive(sleepPID) {
		t.Error("sleep started over ssh survived Terminate")
	}
	if b, err := os.ReadFile(filepath.Join(data, "hello")); err != nil || string(b) != "over-ssh\n" {
		t.Errorf("after Terminate the attached volume holds %q, %v", b, err)
	}
}

func TestSSHDFailureShowsOnConsole(t *testing.T) {
	needSSHD(t)
	p := newTestProvider(t, Options{})
	ctx := t.Context()
	_, pub, _ := newTestKey(t)
	if err := p.ImportKeyPair(ctx, "k", pub); err != nil {
		t.Fatal(err)
	}
	spec := launchSpec("#!/bin/bash\necho user-data-ran\n", nil)
	spec.KeyName = "k"
	insts, err := p.Launch(ctx, spec, 1)
	if err != nil {
		t.Fatal(err)
	}
	in := insts[0]
	waitConsole(t, p, in.ID, "user-data-ran")
	if _, err := p.Stop(ctx, []string{in.ID}); err != nil {
		t.Fatal(err)
	}
	// Something else holds the port when the instance boots again.
	ln, err := net.Listen("tcp", net.JoinHostPort(in.PrivateIP, strconv.Itoa(sshPort)))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	if _, err := p.Start(ctx, []string{in.ID}); err != nil {
		t.Fatal(err)
	}
	// The user-data still runs, after the failure is reported.
	var out string
	waitUntil(t, "the second boot's user-data", func() bool {
		b, err := p.ConsoleOutput(ctx, in.ID)
		if err != nil {
			t.Fatal(err)
		}
		out = string(b)
		return strings.Count(out, "user-data-ran") == 2
	})
	if i := strings.Index(out, "hangar-local: sshd exited at start"); i < 0 || i > strings.LastIndex(out, "user-data-ran") {
		t.Errorf("console does not report sshd's failure before the user-data:\n%s", out)
	}
	if n := len(hostKeyBlocks(t, out)); n != 1 {
		t.Errorf("console shows %d host key blocks, want only the first boot's:\n%s", n, out)
	}
	if !strings.Contains(out, "Address already in use") {
		t.Errorf("console does not say why sshd failed:\n%s", out)
	}
}

func TestSSHConfigRefusesUnwritablePaths(t *testing.T) {
	r := &record{ID: "i-0123456789abcdef0", PrivateIP: "127.1.2.3"}
	for _, dir := range []string{`/tmp/a"b`, `/tmp/a\b`, "/tmp/a\nb"} {
		if _, err := sshdConfig(dir, r, "me"); err == nil {
			t.Errorf("sshdConfig(%q) succeeded", dir)
		}
	}
	cfg, err := sshdConfig("/srv/hangar 1/%x", r, "me")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"ListenAddress 127.1.2.3:2222\n",
		`AuthorizedKeysFile "/srv/hangar 1/%%x/ssh/authorized_keys"` + "\n",
		`HostKey "/srv/hangar 1/%x/ssh/ssh_host_ed25519_key"` + "\n",
		`AllowUsers "me"` + "\n",
		`SetEnv "HANGAR_LOCAL_INSTANCE_ID=i-0123456789abcdef0" "HANGAR_ROOT=/srv/hangar 1/%x/disk"` + "\n",
	} {
		if !strings.Contains(cfg, want) {
			t.Errorf("sshd_config lacks %q:\n%s", want, cfg)
		}
	}
}

func readPID(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("pid file %s: %q", path, b)
	}
	return pid
}

func TestParseProcNetAddr(t *testing.T) {
	// /proc/net/tcp prints the address word as it lies in memory.
	word := func(ip string) string {
		return strings.ToUpper(strconv.FormatUint(uint64(binary.NativeEndian.Uint32(net.ParseIP(ip).To4())), 16))
	}
	for _, tc := range []struct {
		in, want string
		ok       bool
	}{
		{fmt.Sprintf("%08s:08AE", word("127.1.2.3")), "127.1.2.3:2222", true},
		{fmt.Sprintf("%08s:0016", word("10.0.0.1")), "10.0.0.1:22", true},
		{"0100007F", "", false},
		{"00000000000000000000000000000000:0016", "", false}, // IPv6
		{"XYZ0007F:0016", "", false},
	} {
		got, ok := parseProcNetAddr(tc.in)
		if got != tc.want || ok != tc.ok {
			t.Errorf("parseProcNetAddr(%q) = %q, %v; want %q, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}
