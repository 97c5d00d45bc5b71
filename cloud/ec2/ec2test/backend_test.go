package ec2test

import (
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"net"
	"os"
	"os/user"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/local"
	"github.com/hangar-ci/hangar/internal/testutil"
)

// newLocalBackend opens a local cloud in a temp dir and, at cleanup,
// terminates everything it runs.
func newLocalBackend(t *testing.T) *local.Provider {
	t.Helper()
	p, err := local.New(t.Context(), local.Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatalf("local.New: %v", err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		insts, err := p.List(ctx, nil)
		if err != nil {
			t.Errorf("cleanup: listing local instances: %v", err)
		}
		var ids []string
		for _, in := range insts {
			ids = append(ids, in.ID)
		}
		if _, err := p.Terminate(ctx, ids); err != nil {
			t.Errorf("cleanup: terminating local instances: %v", err)
		}
		_ = p.Close()
	})
	return p
}

func localState(t *testing.T, p *local.Provider, id string) cloud.State {
	t.Helper()
	insts, err := p.List(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range insts {
		if in.ID == id {
			return in.State
		}
	}
	return cloud.StateUnknown
}

// consoleOf polls GetConsoleOutput until it contains want.
func consoleOf(t *testing.T, s *Server, id, want string) string {
	t.Helper()
	return consoleIn(t, s, "us-east-1", id, want)
}

// consoleIn is consoleOf in a region.
func consoleIn(t *testing.T, s *Server, region, id, want string) string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		r := mustCallIn(t, s, region, "GetConsoleOutput", "InstanceId", id)
		out, err := base64.StdEncoding.DecodeString(r.root.get("output"))
		if err != nil {
			t.Fatalf("console output is not base64: %v", err)
		}
		if strings.Contains(string(out), want) {
			return string(out)
		}
		if time.Now().After(deadline) {
			t.Fatalf("console of %s never showed %q; last:\n%s", id, want, out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestLocalBackendRunsUserData(t *testing.T) {
	t.Parallel()
	p := newLocalBackend(t)
	s := newServer(t, Options{Backend: p})
	launch := []string{
		"InstanceType", "t3.small", "ClientToken", "intent-local",
		"UserData", b64("#!/bin/bash\necho \"user-data says $((6 * 7))\"\n"),
		"TagSpecification.1.ResourceType", "instance", "TagSpecification.1.Tag.1.Key", cloud.TagPool, "TagSpecification.1.Tag.1.Value", "demo",
	}
	r := run(t, s, 1, launch...)
	id := r.instanceIDs()[0]
	insts, err := p.List(t.Context(), map[string]string{cloud.TagPool: "demo"})
	if err != nil || len(insts) != 1 || insts[0].ID != id {
		t.Fatalf("local cloud runs %+v (%v), want the EC2 instance %s", insts, err, id)
	}
	if ip := r.root.get("instancesSet/item/privateIpAddress"); ip != insts[0].PrivateIP {
		t.Errorf("EC2 shows address %s, the local instance has %s", ip, insts[0].PrivateIP)
	}
	consoleOf(t, s, id, "user-data says 42")

	if again := run(t, s, 1, launch...).instanceIDs(); again[0] != id {
		t.Errorf("repeat launch returned %v, want %s", again, id)
	}
	if insts, _ := p.List(t.Context(), nil); len(insts) != 1 {
		t.Errorf("local cloud runs %d instances after a repeated launch, want 1", len(insts))
	}

	mustCall(t, s, "StopInstances", "InstanceId.1", id)
	if st := localState(t, p, id); st != cloud.StateStopped {
		t.Errorf("local instance is %s after StopInstances", st)
	}
	mustCall(t, s, "StartInstances", "InstanceId.1", id)
	if st := localState(t, p, id); st != cloud.StateRunning {
		t.Errorf("local instance is %s after StartInstances", st)
	}
	mustCall(t, s, "TerminateInstances", "InstanceId.1", id)
	if st := localState(t, p, id); st != cloud.StateTerminated {
		t.Errorf("local instance is %s after TerminateInstances", st)
	}
}

func TestLocalBackendRefusal(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{Backend: newLocalBackend(t)})
	// The local cloud runs shell and MIME user-data only.
	r := call(t, s, "RunInstances", "ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1", "UserData", b64("#cloud-config\n"))
	wantError(t, r, 500, "InternalError")
	if !strings.Contains(r.message(), "cloud-config") {
		t.Errorf("message %q does not say why", r.message())
	}
	if len(s.Instances()) != 0 {
		t.Errorf("a failed backend launch left instances")
	}
}

// TestStorageBackend checks what reaches a storage backend, with the fake
// memBackend whose ids are not EC2's and whose work can be held pending.
func TestStorageBackend(t *testing.T) {
	t.Parallel()
	b := newMemBackend()
	s := newServer(t, Options{Regions: []string{"us-east-1", "eu-west-1"}, Backend: b})
	key := publicKey(t, "ops@example")
	mustCall(t, s, "ImportKeyPair", "KeyName", "ops", "PublicKeyMaterial", b64(string(key)))
	if got := b.keys["ops"]; got != strings.TrimSpace(string(key)) {
		t.Errorf("backend has key %q, want the imported one", got)
	}
	r := run(t, s, 1, "KeyName", "ops", "SubnetId", "subnet-us-east-1b")
	id := r.instanceIDs()[0]
	if ip := mustCall(t, s, "DescribeInstances", "InstanceId.1", id).root.get("reservationSet/item/instancesSet/item/ipAddress"); ip != b.instances[id].PublicIP || ip == "" {
		t.Errorf("ipAddress %q, want the backend's %q", ip, b.instances[id].PublicIP)
	}

	// A volume is creating until both the backend and VolumeDelay (0)
	// are done.
	b.setHold(true)
	vol := volumeIn(t, s, "us-east-1b", 4)
	bv := s.Region("").Volumes()[0].BackendID
	if !strings.HasPrefix(bv, "mem-vol-") {
		t.Fatalf("backend id %q", bv)
	}
	if st, _ := volumeState(t, s, vol); st != "creating" {
		t.Errorf("volume the backend still makes is %s, want creating", st)
	}
	b.release()
	if st, _ := volumeState(t, s, vol); st != "available" {
		t.Errorf("volume is %s once the backend is done, want available", st)
	}
	mustCall(t, s, "AttachVolume", "VolumeId", vol, "InstanceId", id, "Device", "/dev/sdf")
	if v, _ := b.volume(bv); v.InstanceID != id || v.Device != "/dev/sdf" {
		t.Errorf("backend volume %+v, want attached to %s as /dev/sdf", v, id)
	}

	b.setHold(true)
	snap := mustCall(t, s, "CreateSnapshot", "VolumeId", vol).root.get("snapshotId")
	d := mustCall(t, s, "DescribeSnapshots", "SnapshotId.1", snap)
	if st, p := d.root.get("snapshotSet/item/status"), d.root.get("snapshotSet/item/progress"); st != "pending" || p != "99%" {
		t.Errorf("snapshot the backend still makes: %s %s, want pending 99%%", st, p)
	}
	b.release()
	copied := mustCallIn(t, s, "eu-west-1", "CopySnapshot", "SourceRegion", "us-east-1", "SourceSnapshotId", snap).root.get("snapshotId")
	cv := mustCallIn(t, s, "eu-west-1", "CreateVolume", "AvailabilityZone", "eu-west-1a", "SnapshotId", copied).root.get("volumeId")
	ami := mustCall(t, s, "CreateImage", "InstanceId", id, "Name", "img").root.get("imageId")
	cp := mustCallIn(t, s, "eu-west-1", "CopyImage", "SourceRegion", "us-east-1", "SourceImageId", ami, "Name", "img").root.get("imageId")
	mustCallIn(t, s, "eu-west-1", "RunInstances", "ImageId", cp, "MinCount", "1", "MaxCount", "1")
	var amiB string
	for _, im := range s.Region("").Images() {
		if im.ID == ami {
			amiB = im.backendID
		}
	}
	mustCall(t, s, "DetachVolume", "VolumeId", vol)
	mustCall(t, s, "DeregisterImage", "ImageId", ami)
	mustCall(t, s, "DeleteVolume", "VolumeId", vol)

	snapB := s.Region("").Snapshots()[0].BackendID
	copiedB := s.Region("eu-west-1").Snapshots()[0].BackendID
	cvB := s.Region("eu-west-1").Volumes()[0].BackendID
	images := s.Region("eu-west-1").Images()
	copyB := images[len(images)-1].backendID
	if cvB == "" || copiedB == "" || copyB == "" || amiB == "" || s.Region("eu-west-1").Volumes()[0].ID != cv {
		t.Fatalf("backend ids: copy %q, its volume %q, image %q", copiedB, cvB, copyB)
	}
	calls := b.callLog()
	for _, want := range []string{
		"ImportKeyPair ops",
		"Launch ec2test/" + DefaultImageID + " ops", // an image the backend has no copy of
		"CreateVolume us-east-1b 4 ",
		"AttachVolume " + bv + " " + id + " /dev/sdf",
		"CreateSnapshot " + bv,
		"CopySnapshot " + memRegion + " " + snapB, // inside the backend's one region
		"CreateVolume eu-west-1a 4 " + copiedB,
		"CreateImage " + id + " " + ami, // named after the ec2test id
		"RegisterImage " + cp,
		"Launch " + copyB + " ",
		"DetachVolume " + bv + " false",
		"DeregisterImage " + amiB,
		"DeleteVolume " + bv,
	} {
		if !slices.Contains(calls, want) {
			t.Errorf("backend was not asked %q; it saw:\n%s", want, strings.Join(calls, "\n"))
		}
	}

	// A backend refusal is an InternalError and leaves nothing half-made.
	before := len(s.Region("eu-west-1").KeyPairs())
	r = callIn(t, s, "eu-west-1", "ImportKeyPair", "KeyName", "ops", "PublicKeyMaterial", b64(string(publicKey(t, ""))))
	wantError(t, r, 500, "InternalError")
	if !strings.Contains(r.message(), "a different key has that name") {
		t.Errorf("message %q does not say why", r.message())
	}
	if after := len(s.Region("eu-west-1").KeyPairs()); after != before {
		t.Errorf("a refused import left a key pair")
	}
}

// TestLocalBackendStorage drives the local cloud through EC2 calls: a
// server launched with a key pair runs a real sshd, in which an attached
// volume is visible; the volume's data goes through a snapshot copied to
// another region, and an image of the server boots there with its disk.
func TestLocalBackendStorage(t *testing.T) {
	t.Parallel()
	if _, err := os.Stat("/usr/sbin/sshd"); err != nil {
		testutil.ToolMissing(t, "local instances with a key pair need OpenSSH's sshd (apt-get install openssh-server)")
	}
	p := newLocalBackend(t)
	s := newServer(t, Options{Regions: []string{"us-east-1", "eu-west-1"}, Backend: p})
	pub, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	sshPub, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	mustCall(t, s, "ImportKeyPair", "KeyName", "staging", "PublicKeyMaterial", base64.StdEncoding.EncodeToString(ssh.MarshalAuthorizedKey(sshPub)))
	r := run(t, s, 1, "KeyName", "staging", "ClientToken", "staging-server", "SubnetId", "subnet-us-east-1a",
		"UserData", b64("#!/bin/bash\necho baked > \"$HANGAR_ROOT/baked\"\necho server up\n"))
	id, ip := r.instanceIDs()[0], r.root.get("instancesSet/item/privateIpAddress")
	console := consoleOf(t, s, id, "-----END SSH HOST KEY KEYS-----")

	vol := volumeIn(t, s, "us-east-1a", 1)
	mustCall(t, s, "AttachVolume", "VolumeId", vol, "InstanceId", id, "Device", "/dev/sdf")
	c := dialLocal(t, net.JoinHostPort(ip, strconv.Itoa(p.Capabilities().SSHPort)), signer, hostKey(t, console))
	if got := sshOutput(t, c, `echo from-ec2test > "$HANGAR_ROOT/dev/sdf/msg" && cat "$HANGAR_ROOT/dev/sdf/msg"`); got != "from-ec2test\n" {
		t.Fatalf("the attached volume over ssh: %q", got)
	}

	// The volume's data, snapshotted and copied to eu-west-1.
	snap := mustCall(t, s, "CreateSnapshot", "VolumeId", vol).root.get("snapshotId")
	waitFor(t, s, "us-east-1", "DescribeSnapshots", "snapshotSet/item/status", "completed", "SnapshotId.1", snap)
	copied := mustCallIn(t, s, "eu-west-1", "CopySnapshot", "SourceRegion", "us-east-1", "SourceSnapshotId", snap).root.get("snapshotId")
	waitFor(t, s, "eu-west-1", "DescribeSnapshots", "snapshotSet/item/status", "completed", "SnapshotId.1", copied)
	cv := mustCallIn(t, s, "eu-west-1", "CreateVolume", "AvailabilityZone", "eu-west-1a", "SnapshotId", copied).root.get("volumeId")
	waitFor(t, s, "eu-west-1", "DescribeVolumes", "volumeSet/item/status", "available", "VolumeId.1", cv)

	// An image of the server, copied to eu-west-1, boots with its disk.
	ami := mustCall(t, s, "CreateImage", "InstanceId", id, "Name", "staging-image").root.get("imageId")
	waitFor(t, s, "us-east-1", "DescribeImages", "imagesSet/item/imageState", "available", "ImageId.1", ami)
	cp := mustCallIn(t, s, "eu-west-1", "CopyImage", "SourceRegion", "us-east-1", "SourceImageId", ami, "Name", "staging-image").root.get("imageId")
	waitFor(t, s, "eu-west-1", "DescribeImages", "imagesSet/item/imageState", "available", "ImageId.1", cp)
	script := "#!/bin/bash\necho \"disk says $(cat \"$HANGAR_ROOT/baked\")\"\n" +
		"while [ ! -e \"$HANGAR_ROOT/dev/sdg/msg\" ]; do sleep 0.05; done\necho \"volume says $(cat \"$HANGAR_ROOT/dev/sdg/msg\")\"\n"
	other := mustCallIn(t, s, "eu-west-1", "RunInstances", "ImageId", cp, "MinCount", "1", "MaxCount", "1", "ClientToken", "copy-server",
		"SubnetId", "subnet-eu-west-1a", "UserData", b64(script)).instanceIDs()[0]
	waitFor(t, s, "eu-west-1", "DescribeInstances", "reservationSet/item/instancesSet/item/instanceState/name", "running", "InstanceId.1", other)
	mustCallIn(t, s, "eu-west-1", "AttachVolume", "VolumeId", cv, "InstanceId", other, "Device", "/dev/sdg")
	out := consoleIn(t, s, "eu-west-1", other, "volume says")
	if !strings.Contains(out, "disk says baked") || !strings.Contains(out, "volume says from-ec2test") {
		t.Errorf("the copy's console:\n%s", out)
	}
}

// waitFor polls a describe call until the text at path is want.
func waitFor(t *testing.T, s *Server, region, action, path, want string, kv ...string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		got := mustCallIn(t, s, region, action, kv...).root.get(path)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s %v: %s stayed %q, want %q", action, kv, path, got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// hostKey reads the instance's host key from the block its console prints
// once sshd listens, as cloud-init does on EC2.
func hostKey(t *testing.T, console string) ssh.PublicKey {
	t.Helper()
	_, block, ok := strings.Cut(console, "-----BEGIN SSH HOST KEY KEYS-----\n")
	block, _, _ = strings.Cut(block, "-----END SSH HOST KEY KEYS-----")
	if !ok {
		t.Fatalf("no host key block in the console:\n%s", console)
	}
	key, _, _, _, err := ssh.ParseAuthorizedKey([]byte(block))
	if err != nil {
		t.Fatalf("host key block %q: %v", block, err)
	}
	return key
}

// dialLocal logs in to a local instance's sshd, pinning its host key.
func dialLocal(t *testing.T, addr string, signer ssh.Signer, host ssh.PublicKey) *ssh.Client {
	t.Helper()
	u, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	c, err := ssh.Dial("tcp", addr, &ssh.ClientConfig{
		User: u.Username, Auth: []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback: ssh.FixedHostKey(host), Timeout: 10 * time.Second,
	})
	if err != nil {
		t.Fatalf("ssh to %s: %v", addr, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func sshOutput(t *testing.T, c *ssh.Client, cmd string) string {
	t.Helper()
	sess, err := c.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sess.Close() }()
	out, err := sess.CombinedOutput(cmd)
	if err != nil {
		t.Fatalf("ssh %q: %v: %s", cmd, err, out)
	}
	return string(out)
}
