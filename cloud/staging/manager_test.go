package staging_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/local"
	"github.com/hangar-ci/hangar/cloud/staging"
	"github.com/hangar-ci/hangar/internal/testutil"
)

// localStaging is a staging manager on a fresh local cloud whose instances
// are all terminated when the test ends.
type localStaging struct {
	t     *testing.T
	dir   string
	out   *bytes.Buffer
	cloud map[string]*local.Provider
	mgr   map[string]*staging.Manager
}

func needStagingTools(t *testing.T) {
	t.Helper()
	testutil.NeedTools(t, "apt-get install openssh-server openssh-client rsync", "/usr/sbin/sshd", "rsync", "ssh")
	if os.Geteuid() == 0 {
		if _, err := os.Stat("/run/sshd"); err != nil {
			testutil.ToolMissing(t, "/run/sshd missing (sshd's privilege separation directory: mkdir -p /run/sshd && chmod 0755 /run/sshd)")
		}
	}
}

func newLocalStaging(t *testing.T) *localStaging {
	needStagingTools(t)
	ls := &localStaging{t: t, dir: t.TempDir(), out: &bytes.Buffer{}, cloud: map[string]*local.Provider{}, mgr: map[string]*staging.Manager{}}
	t.Cleanup(func() {
		ctx := context.Background()
		for _, p := range ls.cloud {
			insts, _ := p.List(ctx, nil)
			var ids []string
			for _, in := range insts {
				ids = append(ids, in.ID)
			}
			_, _ = p.Terminate(ctx, ids)
			_ = p.Close()
		}
		if t.Failed() {
			t.Logf("manager output:\n%s", ls.out)
		}
	})
	return ls
}

func (ls *localStaging) manager(region string) *staging.Manager {
	if m := ls.mgr[region]; m != nil {
		return m
	}
	m := ls.open(region, staging.OnExitTerminate)
	ls.mgr[region] = m
	return m
}

// open makes a new manager on region's cloud, like a new `hangar staging`
// command would.
func (ls *localStaging) open(region, onExit string) *staging.Manager {
	t := ls.t
	ctx := context.Background()
	p := ls.cloud[region]
	if p == nil {
		var err error
		p, err = local.New(ctx, local.Options{Dir: filepath.Join(ls.dir, "cloud"), Region: region})
		if err != nil {
			t.Fatal(err)
		}
		ls.cloud[region] = p
	}
	u, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	m, err := staging.New(ctx, staging.Options{
		Provider:     p,
		ProviderName: "local",
		Dir:          filepath.Join(ls.dir, "staging"),
		User:         u.Username,
		OnExit:       onExit,
		ReadyTimeout: time.Minute,
		OtherRegion: func(ctx context.Context, r string) (*staging.Manager, error) {
			return ls.manager(r), nil //nolint:contextcheck // the other region's manager is cached for the whole test, so it must outlive this call's ctx
		},
		Progress: ls.out,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Close(ctx); err != nil {
			t.Errorf("closing the staging manager of %s: %v", region, err)
		}
	})
	return m
}

// writeTree makes a small tree with the things rsync must carry.
func writeTree(t *testing.T, dir string) {
	t.Helper()
	files := map[string]string{"a.txt": "alpha\n", "sub/b.bin": strings.Repeat("b", 100000), "sub/deeper/c": "c"}
	for name, body := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("a.txt", filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "empty"), 0o700); err != nil {
		t.Fatal(err)
	}
}

// digest describes a tree: each entry's path, mode, and content or target.
func digest(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		info, err := d.Info()
		if err != nil {
			return err
		}
		fmt.Fprintf(&b, "%s %v", rel, info.Mode())
		switch {
		case info.Mode()&fs.ModeSymlink != 0:
			target, _ := os.Readlink(p)
			fmt.Fprintf(&b, " -> %s", target)
		case info.Mode().IsRegular():
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(&b, " %x", sha256.Sum256(data))
		}
		b.WriteString("\n")
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func TestVolumeReuseSnapshotGrowOnLocalCloud(t *testing.T) {
	ls := newLocalStaging(t)
	m := ls.manager("")
	ctx := context.Background()

	v, srv, err := m.ProvisionVolume(ctx, staging.VolumeSpec{Name: "cache", SizeGB: 1})
	if err != nil {
		t.Fatal(err)
	}
	if v.Cloud.State != cloud.VolumeInUse || v.Cloud.InstanceID != srv.Instance.ID {
		t.Fatalf("volume after provisioning: %+v", v.Cloud)
	}
	if _, _, err := m.ProvisionVolume(ctx, staging.VolumeSpec{Name: "cache", SizeGB: 1}); err == nil {
		t.Fatal("a second volume of the same name was provisioned")
	}

	src := t.TempDir()
	writeTree(t, src)
	if err := m.Rsync(ctx, nil, src+"/", "vol:cache:/tree"); err != nil {
		t.Fatal(err)
	}
	back := t.TempDir()
	if err := m.Rsync(ctx, nil, "vol:cache:/tree/", back); err != nil {
		t.Fatal(err)
	}
	if got, want := digest(t, back), digest(t, src); got != want {
		t.Fatalf("round trip through the volume changed the tree:\n got %s\nwant %s", got, want)
	}

	snap, err := m.Snapshot(ctx, "cache", "first")
	if err != nil {
		t.Fatal(err)
	}
	if snap.State != cloud.SnapshotCompleted || snap.Tags[staging.TagName] != "cache" {
		t.Fatalf("snapshot: %+v", snap)
	}
	if err := m.DeleteVolume(ctx, "cache"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.FindVolume(ctx, "cache"); !errors.Is(err, cloud.ErrNotFound) {
		t.Fatalf("deleted volume still found: %v", err)
	}

	// Same name again: starts from the snapshot, grown to 3 GB.
	v, _, err = m.ProvisionVolume(ctx, staging.VolumeSpec{Name: "cache", SizeGB: 3})
	if err != nil {
		t.Fatal(err)
	}
	if v.Cloud.SnapshotID != snap.ID || v.Cloud.SizeGB != 3 {
		t.Fatalf("reused volume: snapshot %q size %d, want %s and 3", v.Cloud.SnapshotID, v.Cloud.SizeGB, snap.ID)
	}
	again := t.TempDir()
	if err := m.Rsync(ctx, nil, "vol:cache:/tree/", again); err != nil {
		t.Fatal(err)
	}
	if got, want := digest(t, again), digest(t, src); got != want {
		t.Fatalf("volume made from the snapshot differs:\n got %s\nwant %s", got, want)
	}
	if err := m.DeleteVolume(ctx, "cache"); err != nil {
		t.Fatal(err)
	}

	// Smaller than the snapshot is refused; NoReuse starts empty.
	if _, _, err := m.ProvisionVolume(ctx, staging.VolumeSpec{Name: "cache", SizeGB: 1, SnapshotID: snap.ID}); err != nil {
		t.Fatalf("same size as the snapshot: %v", err)
	}
	if err := m.DeleteVolume(ctx, "cache"); err != nil {
		t.Fatal(err)
	}
	v, _, err = m.ProvisionVolume(ctx, staging.VolumeSpec{Name: "cache", SizeGB: 1, NoReuse: true})
	if err != nil {
		t.Fatal(err)
	}
	if v.Cloud.SnapshotID != "" {
		t.Fatalf("NoReuse volume came from snapshot %s", v.Cloud.SnapshotID)
	}
}

func TestProvisionVolumeRefusesBadSpecs(t *testing.T) {
	ls := newLocalStaging(t)
	m := ls.manager("")
	ctx := context.Background()
	for _, spec := range []staging.VolumeSpec{
		{Name: "Bad Name", SizeGB: 1},
		{Name: "x", SizeGB: 1, FSType: "ntfs"},
		{Name: "x", SizeGB: 1, Mount: "relative/path"},
		{Name: "x", SizeGB: 1, Mount: "/"},
		{Name: "x", SizeGB: 0},
		{Name: "x", SizeGB: -1},
		{Name: "x", SnapshotID: "snap-00000000000000000"},
	} {
		if _, _, err := m.ProvisionVolume(ctx, spec); err == nil {
			t.Errorf("ProvisionVolume(%+v) succeeded", spec)
		}
	}
	if n := len(m.Servers()); n != 0 {
		t.Errorf("bad specs launched %d servers", n)
	}
}

func TestCopySnapshotAndImageBetweenLocalRegions(t *testing.T) {
	ls := newLocalStaging(t)
	m := ls.manager("")
	ctx := context.Background()
	if _, _, err := m.ProvisionVolume(ctx, staging.VolumeSpec{Name: "img", SizeGB: 1}); err != nil {
		t.Fatal(err)
	}
	src := t.TempDir()
	writeTree(t, src)
	if err := m.Rsync(ctx, nil, src+"/", "vol:img:/"); err != nil {
		t.Fatal(err)
	}
	snap, err := m.Snapshot(ctx, "img", "")
	if err != nil {
		t.Fatal(err)
	}
	eu, err := m.InRegion(ctx, "eu-test")
	if err != nil {
		t.Fatal(err)
	}

	// The cloud's own copy call.
	cp, err := m.CopySnapshot(ctx, snap.ID, eu)
	if err != nil {
		t.Fatal(err)
	}
	if cp.State != cloud.SnapshotCompleted || cp.Tags[staging.TagCopiedFrom] != m.Region()+"/"+snap.ID || cp.Tags[staging.TagName] != "img" {
		t.Fatalf("copied snapshot: %+v", cp)
	}
	// In the destination, the volume name starts from the copy.
	v, _, err := eu.ProvisionVolume(ctx, staging.VolumeSpec{Name: "img", SizeGB: 1})
	if err != nil {
		t.Fatal(err)
	}
	if v.Cloud.SnapshotID != cp.ID {
		t.Fatalf("volume in eu-test came from %q, want the copy %s", v.Cloud.SnapshotID, cp.ID)
	}
	got := t.TempDir()
	if err := eu.Rsync(ctx, nil, "vol:img:/", got); err != nil {
		t.Fatal(err)
	}
	if digest(t, got) != digest(t, src) {
		t.Fatal("copied snapshot's data differs")
	}

	// The local cloud has no image copy call: staging servers in both
	// regions copy the image's volumes, and the copy is registered there.
	img, err := m.Storage().RegisterImage(ctx, cloud.ImageSpec{
		Name: "builder", RootDevice: "/dev/xvda",
		Devices: []cloud.BlockDevice{{Device: "/dev/xvda", SnapshotID: snap.ID}},
	})
	if err != nil {
		t.Fatal(err)
	}
	copied, err := m.CopyImage(ctx, img.ID, eu)
	if err != nil {
		t.Fatal(err)
	}
	if copied.Name != "builder" || copied.State != cloud.ImageAvailable || len(copied.Devices) != 1 {
		t.Fatalf("copied image: %+v", copied)
	}
	root := copied.Devices[0].SnapshotID
	if _, _, err := eu.ProvisionVolume(ctx, staging.VolumeSpec{Name: "check", SnapshotID: root, FSType: "ext4"}); err != nil {
		t.Fatal(err)
	}
	got2 := t.TempDir()
	if err := eu.Rsync(ctx, nil, "vol:check:/", got2); err != nil {
		t.Fatal(err)
	}
	if digest(t, got2) != digest(t, src) {
		t.Fatal("copied image's root snapshot differs")
	}
	// Nothing of the copy's scaffolding is left in either region.
	for _, mm := range []*staging.Manager{m, eu} {
		vs, err := mm.Volumes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range vs {
			if strings.HasPrefix(v.Name, "copy-") {
				t.Errorf("copy volume %s (%s) left in %s", v.Name, v.Cloud.ID, mm.Region())
			}
		}
	}
}

func TestChangedHostKeyRefused(t *testing.T) {
	ls := newLocalStaging(t)
	m := ls.manager("")
	ctx := context.Background()
	srv, err := m.ProvisionServer(ctx, staging.ServerSpec{Name: "s1"})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Run(ctx, "true", nil, nil, nil); err != nil {
		t.Fatal(err)
	}
	// Replace the server's pinned key with another one, as an attacker
	// who took over its address would present.
	khPath := filepath.Join(ls.dir, "staging", "known_hosts")
	data, err := os.ReadFile(khPath)
	if err != nil {
		t.Fatal(err)
	}
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	signer, _ := ssh.NewSignerFromKey(priv)
	var lines []string
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		if strings.HasPrefix(line, srv.Instance.ID+" ") {
			line = knownhosts.Line([]string{srv.Instance.ID}, signer.PublicKey())
		}
		lines = append(lines, line)
	}
	if err := os.WriteFile(khPath, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// A second manager (a later `hangar staging` command) must refuse it.
	m2 := ls.open("", staging.OnExitRun)
	s2 := m2.FindServer("s1")
	if s2 == nil {
		t.Fatal("the scan did not find server s1")
	}
	_, err = s2.Client(ctx)
	if !errors.Is(err, staging.ErrHostKeyChanged) {
		t.Fatalf("connecting with a changed host key: %v, want ErrHostKeyChanged", err)
	}
	if err := m2.Rsync(ctx, nil, t.TempDir()+"/", "server:s1:/tmp/x"); !errors.Is(err, staging.ErrHostKeyChanged) {
		t.Fatalf("rsync with a changed host key: %v, want ErrHostKeyChanged", err)
	}
}

func TestCloseStopsServers(t *testing.T) {
	ls := newLocalStaging(t)
	m := ls.open("", staging.OnExitStop)
	ctx := context.Background()
	srv, err := m.ProvisionServer(ctx, staging.ServerSpec{Name: "stopme"})
	if err != nil {
		t.Fatal(err)
	}
	state := func() cloud.State {
		t.Helper()
		insts, err := ls.cloud[""].List(ctx, map[string]string{staging.TagName: "stopme"})
		if err != nil || len(insts) != 1 {
			t.Fatalf("listing stopme: %+v, %v", insts, err)
		}
		return insts[0].State
	}
	// A manager that only looked (`hangar staging servers`) stops nothing.
	lister := ls.open("", staging.OnExitTerminate)
	if len(lister.Servers()) != 1 {
		t.Fatalf("lister sees %d servers", len(lister.Servers()))
	}
	if err := lister.Close(ctx); err != nil || state() != cloud.StateRunning {
		t.Fatalf("after a listing manager closed: %s, %v", state(), err)
	}
	// One that used the server while m still does leaves it running.
	user := ls.open("", staging.OnExitTerminate)
	if err := user.FindServer("stopme").Run(ctx, "true", nil, nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := user.Close(ctx); err != nil || state() != cloud.StateRunning {
		t.Fatalf("after a second user closed while m holds the server: %s, %v", state(), err)
	}
	if !strings.Contains(ls.out.String(), "another process is using it") {
		t.Errorf("no word of leaving the server running:\n%s", ls.out)
	}
	if err := m.Close(ctx); err != nil {
		t.Fatal(err)
	}
	insts, err := ls.cloud[""].List(ctx, map[string]string{staging.TagName: "stopme"})
	if err != nil || len(insts) != 1 || insts[0].State != cloud.StateStopped {
		t.Fatalf("after Close with on_exit stop: %+v, %v", insts, err)
	}
	// The next manager starts it again when it is needed.
	m2 := ls.open("", staging.OnExitTerminate)
	out := &bytes.Buffer{}
	if err := m2.FindServer("stopme").Run(ctx, "echo $HANGAR_LOCAL_INSTANCE_ID", nil, out, nil); err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(out.String()) != srv.Instance.ID {
		t.Fatalf("ran on %q, want %s", out, srv.Instance.ID)
	}
}

func TestDDCopiesRawVolumes(t *testing.T) {
	ls := newLocalStaging(t)
	m := ls.manager("")
	ctx := context.Background()
	src, srv, err := m.ProvisionVolume(ctx, staging.VolumeSpec{Name: "disk-a", SizeGB: 1, FSType: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	if src.MountPath != "" || src.Device == "" {
		t.Fatalf("raw volume mounted at %q, device %q", src.MountPath, src.Device)
	}
	// Bytes at the start, the middle and the very end of the device.
	write := "printf head | dd of=%[1]s conv=notrunc status=none && " +
		"printf middle | dd of=%[1]s bs=1 seek=536870912 conv=notrunc status=none && " +
		"printf tail | dd of=%[1]s bs=1 seek=1073741820 conv=notrunc status=none"
	if err := srv.Run(ctx, fmt.Sprintf(write, src.Device), nil, nil, nil); err != nil {
		t.Fatal(err)
	}
	if _, _, err := m.ProvisionVolume(ctx, staging.VolumeSpec{Name: "disk-b", SizeGB: 1, FSType: "raw"}); err != nil {
		t.Fatal(err)
	}
	n, err := m.DD(ctx, "disk-a", "disk-b")
	if err != nil {
		t.Fatal(err)
	}
	if n != 1<<30 {
		t.Fatalf("dd copied %d bytes, want %d", n, 1<<30)
	}
	dst, err := m.FindVolume(ctx, "disk-b")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Mount(ctx, dst); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	read := "dd if=%[1]s bs=4 count=1 status=none; dd if=%[1]s bs=1 skip=536870912 count=6 status=none; dd if=%[1]s bs=1 skip=1073741820 status=none"
	if err := srv.Run(ctx, fmt.Sprintf(read, dst.Device), nil, &out, nil); err != nil {
		t.Fatal(err)
	}
	if out.String() != "headmiddletail" {
		t.Fatalf("the copy reads %q", out.String())
	}
	// Directory volumes have no blocks, and a smaller target is refused.
	if _, _, err := m.ProvisionVolume(ctx, staging.VolumeSpec{Name: "files", SizeGB: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.DD(ctx, "disk-a", "files"); err == nil || !strings.Contains(err.Error(), "directory") {
		t.Fatalf("dd onto a directory volume: %v", err)
	}
}

func TestAdoptExistingVolume(t *testing.T) {
	ls := newLocalStaging(t)
	m := ls.manager("")
	ctx := context.Background()
	raw, err := m.Storage().CreateVolume(ctx, cloud.VolumeSpec{Zone: "local-1a", SizeGB: 1, ClientToken: "adopt-test"})
	if err != nil {
		t.Fatal(err)
	}
	v, srv, err := m.ProvisionVolume(ctx, staging.VolumeSpec{Name: "adopted", VolumeID: raw.ID})
	if err != nil {
		t.Fatal(err)
	}
	if v.Cloud.ID != raw.ID || v.MountPath == "" {
		t.Fatalf("adopted volume: %+v", v)
	}
	found, err := m.FindVolume(ctx, "adopted")
	if err != nil || found.Cloud.ID != raw.ID || found.Cloud.InstanceID != srv.Instance.ID {
		t.Fatalf("FindVolume(adopted) = %+v, %v", found, err)
	}
	// A volume already under a name cannot be adopted again.
	if _, _, err := m.ProvisionVolume(ctx, staging.VolumeSpec{Name: "again", VolumeID: raw.ID}); err == nil {
		t.Fatal("adopted the same volume twice")
	}
}
