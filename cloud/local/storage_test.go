package local

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/cloudtest"
)

func TestStorageConformance(t *testing.T) {
	// Each subtest's second region shares its provider's Dir.
	var dirs sync.Map // *testing.T → Dir
	cloudtest.RunStorage(t, func(t *testing.T) cloud.Provider {
		dir := t.TempDir()
		dirs.Store(t, dir)
		return newTestProvider(t, Options{Dir: dir})
	}, cloudtest.StorageOptions{
		OtherRegion: func(t *testing.T) cloud.Storage {
			dir, ok := dirs.Load(t)
			if !ok {
				t.Fatal("OtherRegion called before the provider was made")
			}
			return newTestProvider(t, Options{Dir: dir.(string), Region: "eu-test"})
		},
	})
}

func TestRegions(t *testing.T) {
	dir := t.TempDir()
	def := newTestProvider(t, Options{Dir: dir})
	named := newTestProvider(t, Options{Dir: dir, Region: "local"})
	eu := newTestProvider(t, Options{Dir: dir, Region: "eu-test"})
	for _, tc := range []struct {
		p    *Provider
		want string
		tree string
	}{{def, "local", dir}, {named, "local", dir}, {eu, "eu-test", filepath.Join(dir, "regions", "eu-test")}} {
		if got := tc.p.Region(); got != tc.want {
			t.Errorf("Region() = %q, want %q", got, tc.want)
		}
		if tc.p.store.dir != tc.tree {
			t.Errorf("region %s keeps its tree in %s, want %s", tc.want, tc.p.store.dir, tc.tree)
		}
	}

	in := launchOne(t, def, "")
	if got, _ := eu.List(t.Context(), nil); len(got) != 0 {
		t.Errorf("region eu-test lists the default region's instances: %+v", got)
	}
	if got, _ := named.List(t.Context(), nil); len(got) != 1 || got[0].ID != in.ID {
		t.Errorf(`region "local" lists %+v, want the default region's %s`, got, in.ID)
	}
	v, err := eu.CreateVolume(t.Context(), cloud.VolumeSpec{SizeGB: 1})
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := def.Volumes(t.Context(), cloud.Filter{}); len(got) != 0 {
		t.Errorf("default region lists eu-test's volumes: %+v", got)
	}
	if got, _ := eu.Volumes(t.Context(), cloud.Filter{}); len(got) != 1 || got[0].ID != v.ID {
		t.Errorf("eu-test lists volumes %+v, want %s", got, v.ID)
	}

	for _, bad := range []string{"EU", "-eu", "eu/../x", "eu_1", strings.Repeat("a", 64)} {
		if _, err := New(t.Context(), Options{Dir: dir, Region: bad}); err == nil || !strings.Contains(err.Error(), "invalid region") {
			t.Errorf("New with region %q: %v, want an invalid region error", bad, err)
		}
	}
}

func TestKeyPairs(t *testing.T) {
	p := newTestProvider(t, Options{})
	key := testAuthorizedKey(t)
	if err := p.ImportKeyPair(t.Context(), "ci.key-1", slices.Concat(key[:len(key)-1], []byte(" me@host\n"))); err != nil {
		t.Fatal(err)
	}
	// The stored key is the key alone: a comment does not make another key.
	if err := p.ImportKeyPair(t.Context(), "ci.key-1", key); err != nil {
		t.Errorf("importing the same key without its comment: %v", err)
	}
	stored, err := os.ReadFile(filepath.Join(p.store.dir, "storage", "keypairs", "ci.key-1.pub"))
	if err != nil || string(stored) != string(key) {
		t.Errorf("stored key pair = %q, %v; want %q", stored, err, key)
	}
	err = p.ImportKeyPair(t.Context(), "ci.key-1", testAuthorizedKey(t))
	if err == nil || !strings.Contains(err.Error(), "taken by another key") {
		t.Errorf("importing another key under a taken name: %v", err)
	}
	for _, tc := range []struct{ name, key string }{
		{"../escape", string(key)},
		{"", string(key)},
		{".hidden", string(key)},
		{"ok", "ssh-ed25519 not-base64"},
		{"two", string(key) + string(testAuthorizedKey(t))},
	} {
		if err := p.ImportKeyPair(t.Context(), tc.name, []byte(tc.key)); err == nil {
			t.Errorf("ImportKeyPair(%q, %.30q) succeeded", tc.name, tc.key)
		}
	}

	spec := launchSpec("", nil)
	spec.KeyName = "no-such-key"
	if _, err := p.Launch(t.Context(), spec, 1); !errors.Is(err, cloud.ErrNotFound) {
		t.Errorf("Launch with an unknown key pair: %v, want ErrNotFound", err)
	}
	if insts, _ := p.List(t.Context(), nil); len(insts) != 0 {
		t.Errorf("failed Launch left instances: %+v", insts)
	}
}

func TestLaunchNeedsSSHD(t *testing.T) {
	p := newTestProvider(t, Options{})
	if err := p.ImportKeyPair(t.Context(), "k", testAuthorizedKey(t)); err != nil {
		t.Fatal(err)
	}
	old := sshdPath
	sshdPath = filepath.Join(t.TempDir(), "sshd")
	t.Cleanup(func() { sshdPath = old })
	spec := launchSpec("", nil)
	spec.KeyName = "k"
	_, err := p.Launch(t.Context(), spec, 1)
	if err == nil || !strings.Contains(err.Error(), "openssh-server") || !strings.Contains(err.Error(), sshdPath) {
		t.Errorf("Launch with a key pair and no sshd: %v, want an error naming %s and openssh-server", err, sshdPath)
	}
	if insts, _ := p.List(t.Context(), nil); len(insts) != 0 {
		t.Errorf("failed Launch left instances: %+v", insts)
	}
}

func TestVolumeData(t *testing.T) {
	p := newTestProvider(t, Options{})
	ctx := t.Context()

	raw, err := p.CreateVolume(ctx, cloud.VolumeSpec{SizeGB: 2, Raw: true, Tags: map[string]string{"k": "v"}})
	if err != nil {
		t.Fatal(err)
	}
	if !validResourceID("vol", raw.ID) || raw.State != cloud.VolumeAvailable || raw.Zone != defaultZone {
		t.Errorf("raw volume = %+v, want an available vol-<17 hex> in %s", raw, defaultZone)
	}
	img := filepath.Join(p.store.volumeDir(raw.ID), "disk.img")
	fi, err := os.Stat(img)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != 2<<30 || fi.Sys().(*syscall.Stat_t).Blocks > 64 {
		t.Errorf("raw volume image is %d bytes in %d blocks, want a sparse 2 GiB", fi.Size(), fi.Sys().(*syscall.Stat_t).Blocks)
	}
	writeAt(t, img, 1<<20, "raw-data")
	rawSnap, err := p.CreateSnapshot(ctx, raw.ID, "raw", nil)
	if err != nil {
		t.Fatal(err)
	}
	if rawSnap.State != cloud.SnapshotCompleted || rawSnap.Progress != "100%" || rawSnap.SizeGB != 2 || rawSnap.VolumeID != raw.ID {
		t.Errorf("snapshot = %+v", rawSnap)
	}
	grown, err := p.CreateVolume(ctx, cloud.VolumeSpec{SnapshotID: rawSnap.ID, SizeGB: 3})
	if err != nil {
		t.Fatal(err)
	}
	grownImg := filepath.Join(p.store.volumeDir(grown.ID), "disk.img")
	if fi, err := os.Stat(grownImg); err != nil || fi.Size() != 3<<30 {
		t.Errorf("volume grown from a 2 GiB raw snapshot: %v, %v bytes; want 3 GiB", err, fi.Size())
	}
	if got := readAt(t, grownImg, 1<<20, 8); got != "raw-data" {
		t.Errorf("grown volume holds %q at 1 MiB, want the snapshot's raw-data", got)
	}

	dir, err := p.CreateVolume(ctx, cloud.VolumeSpec{SizeGB: 1})
	if err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(p.store.volumeDir(dir.ID), "data")
	mustWrite(t, filepath.Join(data, "sub", "f"), "before")
	snap, err := p.CreateSnapshot(ctx, dir.ID, "", map[string]string{"t": "1"})
	if err != nil {
		t.Fatal(err)
	}
	// The snapshot is the volume as it was: later writes do not reach it.
	mustWrite(t, filepath.Join(data, "sub", "f"), "after")
	mustWrite(t, filepath.Join(data, "new"), "x")
	from, err := p.CreateVolume(ctx, cloud.VolumeSpec{SnapshotID: snap.ID})
	if err != nil {
		t.Fatal(err)
	}
	fromData := filepath.Join(p.store.volumeDir(from.ID), "data")
	if b, err := os.ReadFile(filepath.Join(fromData, "sub", "f")); err != nil || string(b) != "before" {
		t.Errorf("volume from the snapshot holds %q, %v; want the data at snapshot time", b, err)
	}
	if _, err := os.Stat(filepath.Join(fromData, "new")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a file written after the snapshot is in a volume made from it: %v", err)
	}
	if from.SizeGB != 1 || from.SnapshotID != snap.ID {
		t.Errorf("volume from snapshot = %+v", from)
	}

	// Idempotent creation: the same token is the same volume.
	spec := cloud.VolumeSpec{SizeGB: 1, ClientToken: "tok-1"}
	a, err := p.CreateVolume(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	b, err := p.CreateVolume(ctx, spec)
	if err != nil || b.ID != a.ID {
		t.Errorf("CreateVolume again with the token = %+v, %v; want %s", b, err, a.ID)
	}

	for _, tc := range []struct {
		name string
		spec cloud.VolumeSpec
		want error
	}{
		{"no size", cloud.VolumeSpec{}, nil},
		{"too big", cloud.VolumeSpec{SizeGB: maxVolumeGB + 1}, nil},
		{"negative", cloud.VolumeSpec{SizeGB: -1}, nil},
		{"bad zone", cloud.VolumeSpec{SizeGB: 1, Zone: "../x"}, nil},
		{"unknown snapshot", cloud.VolumeSpec{SnapshotID: "snap-0000000000000000f"}, cloud.ErrNotFound},
		{"malformed snapshot", cloud.VolumeSpec{SnapshotID: "../../etc"}, cloud.ErrNotFound},
		{"smaller than snapshot", cloud.VolumeSpec{SnapshotID: rawSnap.ID, SizeGB: 1}, nil},
	} {
		v, err := p.CreateVolume(ctx, tc.spec)
		if err == nil || tc.want != nil && !errors.Is(err, tc.want) {
			t.Errorf("%s: CreateVolume = %+v, %v; want an error (%v)", tc.name, v, err, tc.want)
		}
	}
	if ents, _ := os.ReadDir(p.store.storagePath("tmp")); len(ents) != 0 {
		t.Errorf("storage/tmp keeps %d entries after the calls returned", len(ents))
	}

	if _, err := p.CopySnapshot(ctx, "nowhere", snap.ID, "", nil); !errors.Is(err, cloud.ErrNotFound) {
		t.Errorf("CopySnapshot from a region with no tree: %v, want ErrNotFound", err)
	}
	if _, err := p.CopySnapshot(ctx, "local", "snap-0000000000000000f", "", nil); !errors.Is(err, cloud.ErrNotFound) {
		t.Errorf("CopySnapshot of an unknown snapshot: %v, want ErrNotFound", err)
	}
	eu := newTestProvider(t, Options{Dir: p.opts.Dir, Region: "eu-test"})
	cp, err := eu.CopySnapshot(ctx, "local", snap.ID, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	if cp.Description != "[Copied "+snap.ID+" from local]" {
		t.Errorf("copy's default description = %q", cp.Description)
	}
	if b, err := os.ReadFile(filepath.Join(eu.store.snapshotDir(cp.ID), "data", "sub", "f")); err != nil || string(b) != "before" {
		t.Errorf("copied snapshot holds %q, %v", b, err)
	}

	if err := p.DeleteSnapshot(ctx, snap.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p.store.snapshotDir(snap.ID)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("deleted snapshot's data is still there: %v", err)
	}
	if err := p.DeleteVolume(ctx, dir.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(data); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("deleted volume's data is still there: %v", err)
	}
}

func TestAttach(t *testing.T) {
	p := newTestProvider(t, Options{})
	ctx := t.Context()
	in := launchOne(t, p, "#!/bin/bash\nsleep 600\n")
	v, err := p.CreateVolume(ctx, cloud.VolumeSpec{SizeGB: 1})
	if err != nil {
		t.Fatal(err)
	}
	raw, err := p.CreateVolume(ctx, cloud.VolumeSpec{SizeGB: 1, Raw: true})
	if err != nil {
		t.Fatal(err)
	}
	far, err := p.CreateVolume(ctx, cloud.VolumeSpec{SizeGB: 1, Zone: "local-1b"})
	if err != nil {
		t.Fatal(err)
	}
	spare, err := p.CreateVolume(ctx, cloud.VolumeSpec{SizeGB: 1})
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(p.store.instanceDir(in.ID), "disk")

	if _, err := p.AttachVolume(ctx, v.ID, in.ID, "/dev/sdf"); err != nil {
		t.Fatal(err)
	}
	if target, err := os.Readlink(filepath.Join(root, "dev", "sdf")); err != nil || target != filepath.Join(p.store.volumeDir(v.ID), "data") {
		t.Errorf("$HANGAR_ROOT/dev/sdf links to %q, %v; want the volume's data", target, err)
	}
	if _, err := p.AttachVolume(ctx, raw.ID, in.ID, "/dev/xvdg"); err != nil {
		t.Fatal(err)
	}
	if target, err := os.Readlink(filepath.Join(root, "dev", "xvdg")); err != nil || target != filepath.Join(p.store.volumeDir(raw.ID), "disk.img") {
		t.Errorf("$HANGAR_ROOT/dev/xvdg links to %q, %v; want the raw volume's image", target, err)
	}

	other := launchOne(t, p, "")
	for _, tc := range []struct {
		name, vol, inst, device string
		want                    error
	}{
		{"bad device", raw.ID, other.ID, "/dev/sda", nil},
		{"device path", raw.ID, other.ID, "/dev/../etc/sdf", nil},
		{"nvme", raw.ID, other.ID, "/dev/nvme1n1", nil},
		{"in use", v.ID, other.ID, "/dev/sdh", nil},
		{"slot taken by its other name", spare.ID, in.ID, "/dev/xvdf", nil},
		{"other zone", far.ID, other.ID, "/dev/sdh", nil},
		{"unknown volume", "vol-0000000000000000f", in.ID, "/dev/sdh", cloud.ErrNotFound},
		{"unknown instance", far.ID, "i-0000000000000000f", "/dev/sdh", cloud.ErrNotFound},
	} {
		if _, err := p.AttachVolume(ctx, tc.vol, tc.inst, tc.device); err == nil || tc.want != nil && !errors.Is(err, tc.want) {
			t.Errorf("%s: AttachVolume: %v, want an error (%v)", tc.name, err, tc.want)
		}
	}
	if err := p.DeleteVolume(ctx, v.ID); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("DeleteVolume of an attached volume: %v", err)
	}

	// Stopping keeps the attachment, as on EC2.
	if _, err := p.Stop(ctx, []string{in.ID}); err != nil {
		t.Fatal(err)
	}
	if got := volumeState(t, p, v.ID); got.State != cloud.VolumeInUse || got.InstanceID != in.ID {
		t.Errorf("after Stop the volume is %+v, want still attached", got)
	}
	if _, err := p.DetachVolume(ctx, raw.ID, false); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(root, "dev", "xvdg")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the link of a detached volume is still there: %v", err)
	}
	if _, err := p.DetachVolume(ctx, raw.ID, false); err == nil {
		t.Error("DetachVolume of a detached volume succeeded")
	}

	// Terminating detaches and must not reach into the volume through the
	// link, nor through a link to it elsewhere on the disk (the staging
	// engine's mount point).
	data := filepath.Join(p.store.volumeDir(v.ID), "data")
	mustWrite(t, filepath.Join(data, "keep", "me"), "precious")
	if err := os.MkdirAll(filepath.Join(root, "mnt", "Staging"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(data, filepath.Join(root, "mnt", "Staging", "v")); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Terminate(ctx, []string{in.ID}); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(data, "keep", "me")); err != nil || string(b) != "precious" {
		t.Errorf("after Terminate the volume holds %q, %v; want its data untouched", b, err)
	}
	got := volumeState(t, p, v.ID)
	if got.State != cloud.VolumeAvailable || got.InstanceID != "" || got.Device != "" {
		t.Errorf("volume of a terminated instance = %+v, want available and detached", got)
	}
	if _, err := p.AttachVolume(ctx, v.ID, other.ID, "/dev/sdf"); err != nil {
		t.Errorf("attaching the volume of a terminated instance elsewhere: %v", err)
	}
	if _, err := p.AttachVolume(ctx, raw.ID, in.ID, "/dev/sdk"); err == nil {
		t.Error("attaching to a terminated instance succeeded")
	}
	if _, err := p.DetachVolume(ctx, v.ID, false); err != nil {
		t.Fatal(err)
	}
	if err := p.DeleteVolume(ctx, v.ID); err != nil {
		t.Errorf("DeleteVolume after detaching: %v", err)
	}
}

func volumeState(t *testing.T, p *Provider, id string) cloud.Volume {
	t.Helper()
	vs, err := p.Volumes(t.Context(), cloud.Filter{IDs: []string{id}})
	if err != nil || len(vs) != 1 {
		t.Fatalf("Volumes(%s) = %+v, %v", id, vs, err)
	}
	return vs[0]
}

func TestImages(t *testing.T) {
	p := newTestProvider(t, Options{})
	ctx := t.Context()
	in := launchOne(t, p, "#!/bin/bash\nmkdir -p etc && echo baked > etc/motd\necho baked-done\n")
	waitConsole(t, p, in.ID, "baked-done")
	v, err := p.CreateVolume(ctx, cloud.VolumeSpec{SizeGB: 1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.AttachVolume(ctx, v.ID, in.ID, "/dev/sdf"); err != nil {
		t.Fatal(err)
	}
	img, err := p.CreateImage(ctx, in.ID, cloud.ImageSpec{Name: "baked image", Tags: map[string]string{"k": "v"}})
	if err != nil {
		t.Fatal(err)
	}
	if !validResourceID("ami", img.ID) || img.State != cloud.ImageAvailable || img.RootDevice != "/dev/xvda" ||
		len(img.Devices) != 1 || img.Devices[0].SizeGB != defaultRootGB || img.Architecture != "x86_64" {
		t.Errorf("CreateImage = %+v", img)
	}
	if _, err := p.CreateImage(ctx, in.ID, cloud.ImageSpec{Name: "baked image"}); err == nil {
		t.Error("CreateImage with a taken name succeeded")
	}

	spec := launchSpec("#!/bin/bash\necho \"motd=$(cat etc/motd)\"\nls dev 2>/dev/null | sed 's/^/dev:/'\necho listed\n", nil)
	spec.Image = img.ID
	insts, err := p.Launch(ctx, spec, 1)
	if err != nil {
		t.Fatal(err)
	}
	if insts[0].Image != img.ID {
		t.Errorf("instance from the image reports image %q", insts[0].Image)
	}
	out := waitConsole(t, p, insts[0].ID, "listed")
	if !strings.Contains(out, "motd=baked\n") {
		t.Errorf("instance from the image lacks the image's files:\n%s", out)
	}
	if strings.Contains(out, "dev:sdf") {
		t.Errorf("the image carries a link to a volume attached when it was made:\n%s", out)
	}

	// The image's snapshot is in use until the image is gone.
	snapID := img.Devices[0].SnapshotID
	if err := p.DeleteSnapshot(ctx, snapID); err == nil || !strings.Contains(err.Error(), img.ID) {
		t.Errorf("DeleteSnapshot of an image's snapshot: %v", err)
	}
	if _, err := p.CopyImage(ctx, "local", img.ID, cloud.ImageSpec{Name: "x"}); !errors.Is(err, cloud.ErrNotSupported) {
		t.Errorf("CopyImage: %v, want ErrNotSupported", err)
	}
	for _, tc := range []struct {
		name string
		spec cloud.ImageSpec
	}{
		{"no name", cloud.ImageSpec{Devices: []cloud.BlockDevice{{Device: "/dev/xvda", SnapshotID: snapID}}}},
		{"no devices", cloud.ImageSpec{Name: "none"}},
		{"root not a device", cloud.ImageSpec{Name: "r", RootDevice: "/dev/xvdb", Devices: []cloud.BlockDevice{{Device: "/dev/xvda", SnapshotID: snapID}}}},
		{"device twice", cloud.ImageSpec{Name: "twice", Devices: []cloud.BlockDevice{{Device: "/dev/xvda", SnapshotID: snapID}, {Device: "/dev/xvda", SnapshotID: snapID}}}},
		{"too small", cloud.ImageSpec{Name: "small", Devices: []cloud.BlockDevice{{Device: "/dev/xvda", SnapshotID: snapID, SizeGB: 1}}}},
		{"unknown snapshot", cloud.ImageSpec{Name: "unknown", Devices: []cloud.BlockDevice{{Device: "/dev/xvda", SnapshotID: "snap-0000000000000000f"}}}},
	} {
		if got, err := p.RegisterImage(ctx, tc.spec); err == nil {
			t.Errorf("%s: RegisterImage = %+v, want an error", tc.name, got)
		}
	}
	// RegisterImage's client token makes it idempotent.
	reg := cloud.ImageSpec{Name: "again", Devices: []cloud.BlockDevice{{Device: "/dev/xvda", SnapshotID: snapID}}, ClientToken: "t1"}
	a, err := p.RegisterImage(ctx, reg)
	if err != nil {
		t.Fatal(err)
	}
	if b, err := p.RegisterImage(ctx, reg); err != nil || b.ID != a.ID {
		t.Errorf("RegisterImage again with its token = %+v, %v; want %s", b, err, a.ID)
	}

	for _, id := range []string{img.ID, a.ID} {
		if err := p.DeregisterImage(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.DeleteSnapshot(ctx, snapID); err != nil {
		t.Errorf("DeleteSnapshot after its images are gone: %v", err)
	}
	spec.ClientToken = "test-" + randHex(8)
	if _, err := p.Launch(ctx, spec, 1); !errors.Is(err, cloud.ErrNotFound) {
		t.Errorf("Launch from a deregistered image: %v, want ErrNotFound", err)
	}
}

func testAuthorizedKey(t *testing.T) []byte {
	t.Helper()
	_, pub, _ := newTestKey(t)
	return pub
}

func mustWrite(t *testing.T, path, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

func writeAt(t *testing.T, path string, off int64, data string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	if _, err := f.WriteAt([]byte(data), off); err != nil {
		t.Fatal(err)
	}
}

func readAt(t *testing.T, path string, off int64, n int) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return string(b)
}
