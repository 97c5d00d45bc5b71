package ec2test

import (
	"crypto/rand"
	"crypto/rsa"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

func TestKeyPairs(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	key := publicKey(t, "ops@example")
	r := mustCall(t, s, "ImportKeyPair", "KeyName", "ops", "PublicKeyMaterial", b64(string(key)),
		"TagSpecification.1.ResourceType", "key-pair", "TagSpecification.1.Tag.1.Key", "team", "TagSpecification.1.Tag.1.Value", "ci")
	id := r.root.get("keyPairId")
	if !validID(id, "key-") || r.root.get("keyName") != "ops" || r.root.get("tagSet/item/value") != "ci" {
		t.Errorf("ImportKeyPair answered %s", r.body)
	}
	// EC2 fingerprints an imported Ed25519 key as base64 SHA-256.
	pub, _, _, _, err := ssh.ParseAuthorizedKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if want := strings.TrimPrefix(ssh.FingerprintSHA256(pub), "SHA256:") + "="; r.root.get("keyFingerprint") != want {
		t.Errorf("fingerprint %s, want %s", r.root.get("keyFingerprint"), want)
	}
	wantError(t, call(t, s, "ImportKeyPair", "KeyName", "ops", "PublicKeyMaterial", b64(string(key))), 400, "InvalidKeyPair.Duplicate")

	rsaKey, err := rsa.GenerateKey(rand.Reader, 1024) // small: only its format matters
	if err != nil {
		t.Fatal(err)
	}
	rsaPub, err := ssh.NewPublicKey(&rsaKey.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	r = mustCall(t, s, "ImportKeyPair", "KeyName", "legacy", "PublicKeyMaterial", b64(string(ssh.MarshalAuthorizedKey(rsaPub))))
	if got := r.root.get("keyFingerprint"); got != ssh.FingerprintLegacyMD5(rsaPub) {
		t.Errorf("RSA fingerprint %s, want the MD5 %s", got, ssh.FingerprintLegacyMD5(rsaPub))
	}

	for _, tc := range []struct {
		name, action string
		kv           []string
		code         string
	}{
		{"no name", "ImportKeyPair", []string{"PublicKeyMaterial", b64(string(key))}, "MissingParameter"},
		{"no key", "ImportKeyPair", []string{"KeyName", "x"}, "MissingParameter"},
		{"not base64", "ImportKeyPair", []string{"KeyName", "x", "PublicKeyMaterial", "%%%"}, "InvalidParameterValue"},
		{"not a key", "ImportKeyPair", []string{"KeyName", "x", "PublicKeyMaterial", b64("ssh-ed25519 garbage")}, "InvalidKey.Format"},
		{"wrong tag type", "ImportKeyPair", []string{"KeyName", "x", "PublicKeyMaterial", b64(string(key)), "TagSpecification.1.ResourceType", "volume"}, "InvalidParameterValue"},
		{"unknown name", "DescribeKeyPairs", []string{"KeyName.1", "nope"}, "InvalidKeyPair.NotFound"},
		{"unknown id", "DescribeKeyPairs", []string{"KeyPairId.1", "key-0123456789abcdef0"}, "InvalidKeyPair.NotFound"},
		{"bad filter", "DescribeKeyPairs", []string{"Filter.1.Name", "owner-id", "Filter.1.Value.1", "x"}, "InvalidParameterValue"},
		{"delete nothing", "DeleteKeyPair", nil, "MissingParameter"},
		{"launch unknown key", "RunInstances", []string{"ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1", "KeyName", "nope"}, "InvalidKeyPair.NotFound"},
	} {
		t.Run(tc.name, func(t *testing.T) { wantError(t, call(t, s, tc.action, tc.kv...), 400, tc.code) })
	}

	d := mustCall(t, s, "DescribeKeyPairs")
	if got := d.root.texts("keySet/item/keyName"); !slices.Equal(got, []string{"legacy", "ops"}) || d.root.get("keySet/item/publicKey") != "" {
		t.Errorf("DescribeKeyPairs: %s", d.body)
	}
	d = mustCall(t, s, "DescribeKeyPairs", "KeyPairId.1", id, "IncludePublicKey", "true")
	if got := d.root.get("keySet/item/publicKey"); got != strings.TrimSpace(string(key)) {
		t.Errorf("public key %q, want %q", got, key)
	}
	d = mustCall(t, s, "DescribeKeyPairs", "Filter.1.Name", "key-type", "Filter.1.Value.1", "rsa")
	if got := d.root.texts("keySet/item/keyName"); !slices.Equal(got, []string{"legacy"}) {
		t.Errorf("key-type filter: %v", got)
	}

	run(t, s, 1, "KeyName", "ops")
	if got := s.Instances()[0].KeyName; got != "ops" {
		t.Errorf("instance key %q", got)
	}
	mustCall(t, s, "DeleteKeyPair", "KeyPairId", id)
	mustCall(t, s, "DeleteKeyPair", "KeyName", "ops") // gone already: EC2 does not mind
	wantError(t, call(t, s, "RunInstances", "ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1", "KeyName", "ops"), 400, "InvalidKeyPair.NotFound")
	if kps := s.Region("").KeyPairs(); len(kps) != 1 || kps[0].Name != "legacy" || kps[0].Type != "rsa" {
		t.Errorf("KeyPairs() = %+v", kps)
	}
}

// volumeIn creates a volume and returns its id.
func volumeIn(t *testing.T, s *Server, zone string, size int, kv ...string) string {
	t.Helper()
	r := mustCall(t, s, "CreateVolume", append([]string{"AvailabilityZone", zone, "Size", strconv.Itoa(size)}, kv...)...)
	if got := r.root.get("status"); got != "creating" {
		t.Errorf("CreateVolume answered %s, want creating as EC2 does", got)
	}
	return r.root.get("volumeId")
}

func volumeState(t *testing.T, s *Server, id string) (status, attachment string) {
	t.Helper()
	r := mustCall(t, s, "DescribeVolumes", "VolumeId.1", id)
	return r.root.get("volumeSet/item/status"), r.root.get("volumeSet/item/attachmentSet/item/status")
}

func TestVolumeLifecycle(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	inB := run(t, s, 1, "SubnetId", "subnet-us-east-1b").instanceIDs()[0]
	inA := run(t, s, 1, "SubnetId", "subnet-us-east-1a").instanceIDs()[0]
	vol := volumeIn(t, s, "us-east-1b", 10, "TagSpecification.1.ResourceType", "volume", "TagSpecification.1.Tag.1.Key", "hangar:staging", "TagSpecification.1.Tag.1.Value", "v1")
	if st, _ := volumeState(t, s, vol); st != "available" {
		t.Fatalf("volume is %s, want available with VolumeDelay 0", st)
	}
	d := mustCall(t, s, "DescribeVolumes", "VolumeId.1", vol)
	if d.root.get("volumeSet/item/volumeType") != "gp3" || d.root.get("volumeSet/item/iops") != "3000" || d.root.get("volumeSet/item/size") != "10" {
		t.Errorf("defaults: %s", d.body)
	}

	wantError(t, call(t, s, "AttachVolume", "VolumeId", vol, "InstanceId", inA, "Device", "/dev/sdf"), 400, "InvalidVolume.ZoneMismatch")
	wantError(t, call(t, s, "AttachVolume", "VolumeId", vol, "InstanceId", inB, "Device", "sdf"), 400, "InvalidParameterValue")
	wantError(t, call(t, s, "AttachVolume", "VolumeId", vol, "InstanceId", inB, "Device", "/dev/xvda"), 400, "InvalidParameterValue") // the root device
	wantError(t, call(t, s, "AttachVolume", "VolumeId", "vol-0123456789abcdef0", "InstanceId", inB, "Device", "/dev/sdf"), 400, "InvalidVolume.NotFound")
	wantError(t, call(t, s, "AttachVolume", "VolumeId", vol, "InstanceId", "i-0123456789abcdef0", "Device", "/dev/sdf"), 400, "InvalidInstanceID.NotFound")
	wantError(t, call(t, s, "DetachVolume", "VolumeId", vol), 400, "IncorrectState")

	a := mustCall(t, s, "AttachVolume", "VolumeId", vol, "InstanceId", inB, "Device", "/dev/sdf")
	if a.root.get("status") != "attaching" || a.root.get("instanceId") != inB || a.root.get("device") != "/dev/sdf" {
		t.Errorf("AttachVolume answered %s", a.body)
	}
	if st, at := volumeState(t, s, vol); st != "in-use" || at != "attached" {
		t.Errorf("after attach: %s/%s, want in-use/attached", st, at)
	}
	wantError(t, call(t, s, "AttachVolume", "VolumeId", vol, "InstanceId", inB, "Device", "/dev/sdg"), 400, "VolumeInUse")
	other := volumeIn(t, s, "us-east-1b", 1)
	wantError(t, call(t, s, "AttachVolume", "VolumeId", other, "InstanceId", inB, "Device", "/dev/sdf"), 400, "InvalidParameterValue")
	wantError(t, call(t, s, "DeleteVolume", "VolumeId", vol), 400, "VolumeInUse")

	in := mustCall(t, s, "DescribeInstances", "InstanceId.1", inB)
	if got := in.root.texts("reservationSet/item/instancesSet/item/blockDeviceMapping/item/deviceName"); !slices.Equal(got, []string{"/dev/xvda", "/dev/sdf"}) {
		t.Errorf("instance devices %v", got)
	}
	for _, f := range [][]string{
		{"attachment.instance-id", inB}, {"status", "in-use"}, {"tag:hangar:staging", "v*"}, {"tag-key", "hangar:staging"}, {"size", "10"},
	} {
		if got := mustCall(t, s, "DescribeVolumes", "Filter.1.Name", f[0], "Filter.1.Value.1", f[1]).root.texts("volumeSet/item/volumeId"); !slices.Equal(got, []string{vol}) {
			t.Errorf("filter %s=%s found %v, want [%s]", f[0], f[1], got, vol)
		}
	}
	if got := mustCall(t, s, "DescribeVolumes", "Filter.1.Name", "availability-zone", "Filter.1.Value.1", "us-east-1b").root.texts("volumeSet/item/volumeId"); !slices.Equal(got, []string{vol, other}) {
		t.Errorf("zone filter found %v, want [%s %s]", got, vol, other)
	}
	wantError(t, call(t, s, "DescribeVolumes", "Filter.1.Name", "iops", "Filter.1.Value.1", "3"), 400, "InvalidParameterValue")

	wantError(t, call(t, s, "DetachVolume", "VolumeId", vol, "InstanceId", inA), 400, "InvalidAttachment.NotFound")
	det := mustCall(t, s, "DetachVolume", "VolumeId", vol, "InstanceId", inB, "Device", "/dev/sdf")
	if det.root.get("status") != "detaching" {
		t.Errorf("DetachVolume answered %s", det.body)
	}
	if st, at := volumeState(t, s, vol); st != "available" || at != "" {
		t.Errorf("after detach: %s/%s, want available", st, at)
	}

	// EC2 detaches a volume from an instance that terminates.
	mustCall(t, s, "AttachVolume", "VolumeId", other, "InstanceId", inB, "Device", "/dev/sdh")
	mustCall(t, s, "TerminateInstances", "InstanceId.1", inB)
	if st, _ := volumeState(t, s, other); st != "available" {
		t.Errorf("volume of a terminated instance is %s, want available", st)
	}

	mustCall(t, s, "DeleteVolume", "VolumeId", vol)
	wantError(t, call(t, s, "DescribeVolumes", "VolumeId.1", vol), 400, "InvalidVolume.NotFound")
	wantError(t, call(t, s, "DeleteVolume", "VolumeId", vol), 400, "InvalidVolume.NotFound")
	if vs := s.Region("").Volumes(); len(vs) != 1 || vs[0].ID != other {
		t.Errorf("Volumes() = %+v", vs)
	}
}

func TestVolumeDelay(t *testing.T) {
	t.Parallel()
	// Long enough that a loaded machine answers the next call within it.
	const delay = 400 * time.Millisecond
	s := newServer(t, Options{VolumeDelay: delay})
	id := run(t, s, 1).instanceIDs()[0]
	vol := volumeIn(t, s, "us-east-1a", 1)
	if st, _ := volumeState(t, s, vol); st != "creating" {
		t.Fatalf("right after CreateVolume: %s, want creating", st)
	}
	wantError(t, call(t, s, "AttachVolume", "VolumeId", vol, "InstanceId", id, "Device", "/dev/sdf"), 400, "IncorrectState")
	time.Sleep(delay + 50*time.Millisecond)
	mustCall(t, s, "AttachVolume", "VolumeId", vol, "InstanceId", id, "Device", "/dev/sdf")
	if st, at := volumeState(t, s, vol); st != "in-use" || at != "attaching" {
		t.Fatalf("right after AttachVolume: %s/%s, want in-use/attaching", st, at)
	}
	time.Sleep(delay + 50*time.Millisecond)
	if _, at := volumeState(t, s, vol); at != "attached" {
		t.Fatalf("after VolumeDelay: %s, want attached", at)
	}
	mustCall(t, s, "DetachVolume", "VolumeId", vol)
	if st, at := volumeState(t, s, vol); st != "in-use" || at != "detaching" {
		t.Fatalf("right after DetachVolume: %s/%s, want in-use/detaching", st, at)
	}
	time.Sleep(delay + 50*time.Millisecond)
	if st, _ := volumeState(t, s, vol); st != "available" {
		t.Fatalf("after VolumeDelay: %s, want available", st)
	}
}

func TestCreateVolumeChecks(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{SnapshotDelay: time.Hour})
	vol := volumeIn(t, s, "us-east-1a", 8)
	pending := mustCall(t, s, "CreateSnapshot", "VolumeId", vol).root.get("snapshotId")
	zone := []string{"AvailabilityZone", "us-east-1a"}
	for _, tc := range []struct {
		name string
		kv   []string
		code string
	}{
		{"no zone", []string{"Size", "1"}, "MissingParameter"},
		{"unknown zone", []string{"AvailabilityZone", "us-east-1z", "Size", "1"}, "InvalidZone.NotFound"},
		{"zone of another region", []string{"AvailabilityZone", "eu-west-1a", "Size", "1"}, "InvalidZone.NotFound"},
		{"no size", zone, "MissingParameter"},
		{"size 0", append([]string{"Size", "0"}, zone...), "InvalidParameterValue"},
		{"too large", append([]string{"Size", "16385"}, zone...), "InvalidParameterValue"},
		{"st1 too small", append([]string{"Size", "100", "VolumeType", "st1"}, zone...), "InvalidParameterValue"},
		{"bad type", append([]string{"Size", "1", "VolumeType", "gp9"}, zone...), "InvalidParameterValue"},
		{"io1 without iops", append([]string{"Size", "10", "VolumeType", "io1"}, zone...), "MissingParameter"},
		{"gp2 with iops", append([]string{"Size", "10", "VolumeType", "gp2", "Iops", "300"}, zone...), "InvalidParameterCombination"},
		{"gp2 with throughput", append([]string{"Size", "10", "VolumeType", "gp2", "Throughput", "300"}, zone...), "InvalidParameterCombination"},
		{"gp3 iops range", append([]string{"Size", "10", "Iops", "20000"}, zone...), "InvalidParameterValue"},
		{"malformed snapshot", append([]string{"SnapshotId", "snap-x"}, zone...), "InvalidSnapshotID.Malformed"},
		{"unknown snapshot", append([]string{"SnapshotId", "snap-0123456789abcdef0"}, zone...), "InvalidSnapshot.NotFound"},
		{"pending snapshot", append([]string{"SnapshotId", pending}, zone...), "IncorrectState"},
		{"tag type", append([]string{"Size", "1", "TagSpecification.1.ResourceType", "snapshot"}, zone...), "InvalidParameterValue"},
		{"unknown parameter", append([]string{"Size", "1", "OutpostArn", "arn:x"}, zone...), "UnknownParameter"},
	} {
		t.Run(tc.name, func(t *testing.T) { wantError(t, call(t, s, "CreateVolume", tc.kv...), 400, tc.code) })
	}
	if n := len(s.Region("").Volumes()); n != 1 {
		t.Errorf("%d volumes after failed creations, want the one", n)
	}

	// ClientToken: a repeat returns the first volume; other arguments fail.
	args := []string{"AvailabilityZone", "us-east-1b", "Size", "5", "ClientToken", "vol-intent"}
	first := mustCall(t, s, "CreateVolume", args...).root.get("volumeId")
	again := mustCall(t, s, "CreateVolume", args...)
	if again.root.get("volumeId") != first || again.root.get("status") != "available" {
		t.Errorf("repeat answered %s, want %s as it is now", again.body, first)
	}
	wantError(t, call(t, s, "CreateVolume", "AvailabilityZone", "us-east-1b", "Size", "6", "ClientToken", "vol-intent"), 400, "IdempotentParameterMismatch")
	if n := len(s.Region("").Volumes()); n != 2 {
		t.Errorf("%d volumes, want 2", n)
	}
}

func TestSnapshots(t *testing.T) {
	t.Parallel()
	const delay = 400 * time.Millisecond
	s := newServer(t, Options{SnapshotDelay: delay})
	vol := volumeIn(t, s, "us-east-1a", 8, "Encrypted", "true")
	r := mustCall(t, s, "CreateSnapshot", "VolumeId", vol, "Description", "staging data",
		"TagSpecification.1.ResourceType", "snapshot", "TagSpecification.1.Tag.1.Key", "hangar:staging", "TagSpecification.1.Tag.1.Value", "s1")
	snap := r.root.get("snapshotId")
	if r.root.get("status") != "pending" || r.root.get("volumeSize") != "8" || r.root.get("encrypted") != "true" || r.root.get("ownerId") != "123456789012" {
		t.Errorf("CreateSnapshot answered %s", r.body)
	}
	d := mustCall(t, s, "DescribeSnapshots", "SnapshotId.1", snap)
	if st, p := d.root.get("snapshotSet/item/status"), d.root.get("snapshotSet/item/progress"); st != "pending" || p == "100%" || !strings.HasSuffix(p, "%") {
		t.Errorf("right after CreateSnapshot: %s %s, want pending below 100%%", st, p)
	}
	wantError(t, call(t, s, "CreateVolume", "AvailabilityZone", "us-east-1a", "SnapshotId", snap), 400, "IncorrectState")
	wantError(t, call(t, s, "RegisterImage", "Name", "early", "RootDeviceName", "/dev/xvda", "BlockDeviceMapping.1.DeviceName", "/dev/xvda", "BlockDeviceMapping.1.Ebs.SnapshotId", snap), 400, "IncorrectState")
	time.Sleep(delay + 50*time.Millisecond)
	d = mustCall(t, s, "DescribeSnapshots", "SnapshotId.1", snap)
	if st, p := d.root.get("snapshotSet/item/status"), d.root.get("snapshotSet/item/progress"); st != "completed" || p != "100%" {
		t.Errorf("after SnapshotDelay: %s %s, want completed 100%%", st, p)
	}

	// A volume from it takes its size, or a larger one; never smaller.
	v2 := mustCall(t, s, "CreateVolume", "AvailabilityZone", "us-east-1b", "SnapshotId", snap)
	if v2.root.get("size") != "8" || v2.root.get("snapshotId") != snap {
		t.Errorf("volume from snapshot: %s", v2.body)
	}
	mustCall(t, s, "CreateVolume", "AvailabilityZone", "us-east-1b", "SnapshotId", snap, "Size", "20")
	wantError(t, call(t, s, "CreateVolume", "AvailabilityZone", "us-east-1b", "SnapshotId", snap, "Size", "4"), 400, "InvalidParameterValue")

	for _, f := range [][]string{{"volume-id", vol}, {"description", "staging*"}, {"tag:hangar:staging", "s1"}, {"owner-id", "123456789012"}} {
		if got := mustCall(t, s, "DescribeSnapshots", "Filter.1.Name", f[0], "Filter.1.Value.1", f[1]).root.texts("snapshotSet/item/snapshotId"); !slices.Equal(got, []string{snap}) {
			t.Errorf("filter %s=%s found %v", f[0], f[1], got)
		}
	}
	if got := mustCall(t, s, "DescribeSnapshots", "Owner.1", "999999999999").root.texts("snapshotSet/item/snapshotId"); len(got) != 0 {
		t.Errorf("another owner's snapshots: %v", got)
	}
	for _, tc := range []struct {
		kv   []string
		code string
	}{
		{[]string{"SnapshotId.1", "snap-0123456789abcdef0"}, "InvalidSnapshot.NotFound"},
		{[]string{"SnapshotId.1", "snap-zz"}, "InvalidSnapshotID.Malformed"},
		{[]string{"SnapshotId.1", snap, "MaxResults", "5"}, "InvalidParameterCombination"},
		{[]string{"MaxResults", "4"}, "InvalidParameterValue"},
		{[]string{"MaxResults", "5", "NextToken", "nope"}, "InvalidPaginationToken"},
	} {
		wantError(t, call(t, s, "DescribeSnapshots", tc.kv...), 400, tc.code)
	}
	wantError(t, call(t, s, "CreateSnapshot", "VolumeId", "vol-0123456789abcdef0"), 400, "InvalidVolume.NotFound")

	// The root volume of an instance can be snapshotted too.
	root := mustCall(t, s, "DescribeInstances", "InstanceId.1", run(t, s, 1).instanceIDs()[0]).root.get("reservationSet/item/instancesSet/item/blockDeviceMapping/item/ebs/volumeId")
	if r := mustCall(t, s, "CreateSnapshot", "VolumeId", root); r.root.get("volumeSize") != "8" {
		t.Errorf("snapshot of a root volume: %s", r.body)
	}

	img := mustCall(t, s, "RegisterImage", "Name", "uses-snap", "RootDeviceName", "/dev/xvda", "VirtualizationType", "hvm",
		"BlockDeviceMapping.1.DeviceName", "/dev/xvda", "BlockDeviceMapping.1.Ebs.SnapshotId", snap).root.get("imageId")
	wantError(t, call(t, s, "DeleteSnapshot", "SnapshotId", snap), 400, "InvalidSnapshot.InUse")
	mustCall(t, s, "DeregisterImage", "ImageId", img)
	mustCall(t, s, "DeleteSnapshot", "SnapshotId", snap)
	wantError(t, call(t, s, "DeleteSnapshot", "SnapshotId", snap), 400, "InvalidSnapshot.NotFound")
}

func TestSnapshotPagination(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	vol := volumeIn(t, s, "us-east-1a", 1)
	var want []string
	for range 12 {
		want = append(want, mustCall(t, s, "CreateSnapshot", "VolumeId", vol).root.get("snapshotId"))
	}
	var got []string
	token, pages := "", 0
	for {
		kv := []string{"MaxResults", "5", "Owner.1", "self"}
		if token != "" {
			kv = append(kv, "NextToken", token)
		}
		r := mustCall(t, s, "DescribeSnapshots", kv...)
		pages++
		got = append(got, r.root.texts("snapshotSet/item/snapshotId")...)
		if token = r.root.get("nextToken"); token == "" {
			break
		}
	}
	if !slices.Equal(got, want) || pages != 3 {
		t.Errorf("paged %v in %d pages, want %v in 3", got, pages, want)
	}
	// Volumes page the same way.
	for range 5 {
		volumeIn(t, s, "us-east-1b", 1)
	}
	r := mustCall(t, s, "DescribeVolumes", "MaxResults", "5")
	if n := len(r.root.texts("volumeSet/item/volumeId")); n != 5 || r.root.get("nextToken") == "" {
		t.Errorf("first page of 6 volumes: %d and token %q", n, r.root.get("nextToken"))
	}
	r = mustCall(t, s, "DescribeVolumes", "MaxResults", "5", "NextToken", r.root.get("nextToken"))
	if n := len(r.root.texts("volumeSet/item/volumeId")); n != 1 || r.root.get("nextToken") != "" {
		t.Errorf("last page: %d and token %q", n, r.root.get("nextToken"))
	}
}

func TestImages(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{Regions: []string{"us-east-1", "eu-west-1"}})
	id := run(t, s, 1, "SubnetId", "subnet-us-east-1a").instanceIDs()[0]
	vol := volumeIn(t, s, "us-east-1a", 3)
	mustCall(t, s, "AttachVolume", "VolumeId", vol, "InstanceId", id, "Device", "/dev/sdf")

	ami := mustCall(t, s, "CreateImage", "InstanceId", id, "Name", "staging-2026-11", "Description", "a staging server",
		"TagSpecification.1.ResourceType", "image", "TagSpecification.1.Tag.1.Key", "hangar:staging", "TagSpecification.1.Tag.1.Value", "img",
		"TagSpecification.2.ResourceType", "snapshot", "TagSpecification.2.Tag.1.Key", "hangar:staging", "TagSpecification.2.Tag.1.Value", "img").root.get("imageId")
	d := mustCall(t, s, "DescribeImages", "ImageId.1", ami)
	img := d.root.all("imagesSet/item")[0]
	if img.get("imageState") != "available" || img.get("name") != "staging-2026-11" || img.get("description") != "a staging server" ||
		img.get("rootDeviceName") != "/dev/xvda" || img.get("tagSet/item/value") != "img" {
		t.Errorf("created image: %s", d.body)
	}
	if got := img.texts("blockDeviceMapping/item/deviceName"); !slices.Equal(got, []string{"/dev/xvda", "/dev/sdf"}) {
		t.Errorf("image devices %v: the root disk and the attached volume", got)
	}
	snaps := img.texts("blockDeviceMapping/item/ebs/snapshotId")
	sd := mustCall(t, s, "DescribeSnapshots", "SnapshotId.1", snaps[1])
	if sd.root.get("snapshotSet/item/volumeId") != vol || sd.root.get("snapshotSet/item/description") != "Created by CreateImage("+id+") for "+ami ||
		sd.root.get("snapshotSet/item/tagSet/item/value") != "img" {
		t.Errorf("the volume's snapshot: %s", sd.body)
	}
	wantError(t, call(t, s, "CreateImage", "InstanceId", id, "Name", "staging-2026-11"), 400, "InvalidAMIName.Duplicate")
	wantError(t, call(t, s, "CreateImage", "InstanceId", id, "Name", "x"), 400, "InvalidAMIName.Malformed")
	wantError(t, call(t, s, "CreateImage", "InstanceId", "i-0123456789abcdef0", "Name", "xyz"), 400, "InvalidInstanceID.NotFound")

	// RegisterImage: EC2's default virtualization is paravirtual.
	reg := mustCall(t, s, "RegisterImage", "Name", "registered", "RootDeviceName", "/dev/xvda",
		"BlockDeviceMapping.1.DeviceName", "/dev/xvda", "BlockDeviceMapping.1.Ebs.SnapshotId", snaps[0], "BlockDeviceMapping.1.Ebs.VolumeSize", "30").root.get("imageId")
	d = mustCall(t, s, "DescribeImages", "ImageId.1", reg)
	if d.root.get("imagesSet/item/virtualizationType") != "paravirtual" || d.root.get("imagesSet/item/blockDeviceMapping/item/ebs/volumeSize") != "30" ||
		d.root.get("imagesSet/item/enaSupport") != "false" {
		t.Errorf("registered image: %s", d.body)
	}
	run(t, s, 1, "ImageId", reg) // its root size is what the launch checks against
	wantError(t, call(t, s, "RunInstances", "ImageId", reg, "MinCount", "1", "MaxCount", "1", "BlockDeviceMapping.1.DeviceName", "/dev/xvda", "BlockDeviceMapping.1.Ebs.VolumeSize", "10"), 400, "InvalidBlockDeviceMapping")
	for _, tc := range []struct {
		name string
		kv   []string
		code string
	}{
		{"duplicate", []string{"Name", "registered", "RootDeviceName", "/dev/xvda", "BlockDeviceMapping.1.DeviceName", "/dev/xvda", "BlockDeviceMapping.1.Ebs.SnapshotId", snaps[0]}, "InvalidAMIName.Duplicate"},
		{"no root name", []string{"Name", "r-2", "BlockDeviceMapping.1.DeviceName", "/dev/xvda", "BlockDeviceMapping.1.Ebs.SnapshotId", snaps[0]}, "MissingParameter"},
		{"no mappings", []string{"Name", "r-2", "RootDeviceName", "/dev/xvda"}, "MissingParameter"},
		{"root not mapped", []string{"Name", "r-2", "RootDeviceName", "/dev/xvda", "BlockDeviceMapping.1.DeviceName", "/dev/sdf", "BlockDeviceMapping.1.Ebs.SnapshotId", snaps[0]}, "InvalidBlockDeviceMapping"},
		{"smaller than snapshot", []string{"Name", "r-2", "RootDeviceName", "/dev/xvda", "BlockDeviceMapping.1.DeviceName", "/dev/xvda", "BlockDeviceMapping.1.Ebs.SnapshotId", snaps[0], "BlockDeviceMapping.1.Ebs.VolumeSize", "2"}, "InvalidBlockDeviceMapping"},
		{"unknown snapshot", []string{"Name", "r-2", "RootDeviceName", "/dev/xvda", "BlockDeviceMapping.1.DeviceName", "/dev/xvda", "BlockDeviceMapping.1.Ebs.SnapshotId", "snap-0123456789abcdef0"}, "InvalidSnapshot.NotFound"},
		{"bad architecture", []string{"Name", "r-2", "Architecture", "sparc", "RootDeviceName", "/dev/xvda", "BlockDeviceMapping.1.DeviceName", "/dev/xvda", "BlockDeviceMapping.1.Ebs.SnapshotId", snaps[0]}, "InvalidParameterValue"},
		{"image location", []string{"Name", "r-2", "ImageLocation", "bucket/manifest.xml"}, "UnknownParameter"},
	} {
		t.Run(tc.name, func(t *testing.T) { wantError(t, call(t, s, "RegisterImage", tc.kv...), 400, tc.code) })
	}

	// CopyImage to the other region: new ids, the snapshots copied too.
	copyArgs := []string{"SourceRegion", "us-east-1", "SourceImageId", ami, "Name", "staging-2026-11", "ClientToken", "copy-1", "CopyImageTags", "true"}
	cp := mustCallIn(t, s, "eu-west-1", "CopyImage", copyArgs...).root.get("imageId")
	if cp == ami || !validID(cp, "ami-") {
		t.Fatalf("copy id %q", cp)
	}
	if again := mustCallIn(t, s, "eu-west-1", "CopyImage", copyArgs...).root.get("imageId"); again != cp {
		t.Errorf("repeated CopyImage made %s, want %s", again, cp)
	}
	wantError(t, callIn(t, s, "eu-west-1", "CopyImage", "SourceRegion", "us-east-1", "SourceImageId", ami, "Name", "other", "ClientToken", "copy-1"), 400, "IdempotentParameterMismatch")
	d = mustCallIn(t, s, "eu-west-1", "DescribeImages", "Owner.1", "self", "Filter.1.Name", "tag:hangar:staging", "Filter.1.Value.1", "img")
	if got := d.root.texts("imagesSet/item/imageId"); !slices.Equal(got, []string{cp}) {
		t.Fatalf("copied image with its tags: %v", got)
	}
	copied := d.root.texts("imagesSet/item/blockDeviceMapping/item/ebs/snapshotId")
	if len(copied) != 2 || slices.Contains(copied, snaps[0]) || slices.Contains(copied, snaps[1]) {
		t.Errorf("copy's snapshots %v, want two new ones (source %v)", copied, snaps)
	}
	for _, sn := range copied {
		mustCallIn(t, s, "eu-west-1", "DescribeSnapshots", "SnapshotId.1", sn)
		wantError(t, call(t, s, "DescribeSnapshots", "SnapshotId.1", sn), 400, "InvalidSnapshot.NotFound")
	}
	wantError(t, call(t, s, "DescribeImages", "ImageId.1", cp), 400, "InvalidAMIID.NotFound")
	if ids := mustCallIn(t, s, "eu-west-1", "RunInstances", "ImageId", cp, "MinCount", "1", "MaxCount", "1").instanceIDs(); len(ids) != 1 {
		t.Errorf("launch from the copy: %v", ids)
	}
	wantError(t, callIn(t, s, "eu-west-1", "CopyImage", "SourceRegion", "ap-south-1", "SourceImageId", ami, "Name", "x-copy"), 400, "InvalidParameterValue")
	wantError(t, callIn(t, s, "eu-west-1", "CopyImage", "SourceRegion", "us-east-1", "SourceImageId", "ami-0123456789abcdef1", "Name", "x-copy"), 400, "InvalidAMIID.NotFound")

	for _, f := range [][]string{{"name", "staging-*"}, {"description", "a staging*"}, {"tag-key", "hangar:staging"}, {"block-device-mapping.snapshot-id", snaps[1]}} {
		if got := mustCall(t, s, "DescribeImages", "Owner.1", "self", "Filter.1.Name", f[0], "Filter.1.Value.1", f[1], "Filter.2.Name", "state", "Filter.2.Value.1", "available").root.texts("imagesSet/item/imageId"); !slices.Equal(got, []string{ami}) {
			t.Errorf("filter %s=%s found %v", f[0], f[1], got)
		}
	}
	mustCall(t, s, "DeregisterImage", "ImageId", ami)
	wantError(t, call(t, s, "DescribeImages", "ImageId.1", ami), 400, "InvalidAMIID.NotFound")
	wantError(t, call(t, s, "DeregisterImage", "ImageId", ami), 400, "InvalidAMIID.NotFound")
	mustCall(t, s, "DescribeSnapshots", "SnapshotId.1", snaps[0]) // the snapshots stay
}

func TestImageDelay(t *testing.T) {
	t.Parallel()
	const delay = 400 * time.Millisecond
	s := newServer(t, Options{ImageDelay: delay, SnapshotDelay: 2 * delay})
	id := run(t, s, 1).instanceIDs()[0]
	ami := mustCall(t, s, "CreateImage", "InstanceId", id, "Name", "slow-image").root.get("imageId")
	state := func() string {
		t.Helper()
		return mustCall(t, s, "DescribeImages", "ImageId.1", ami).root.get("imagesSet/item/imageState")
	}
	if got := state(); got != "pending" {
		t.Fatalf("right after CreateImage: %s", got)
	}
	wantError(t, call(t, s, "RunInstances", "ImageId", ami, "MinCount", "1", "MaxCount", "1"), 400, "InvalidAMIID.Unavailable")
	wantError(t, call(t, s, "CopyImage", "SourceRegion", "us-east-1", "SourceImageId", ami, "Name", "slow-copy"), 400, "IncorrectState")
	time.Sleep(delay + 50*time.Millisecond)
	if got := state(); got != "pending" {
		t.Fatalf("after ImageDelay but before its snapshot completes: %s, want pending", got)
	}
	time.Sleep(delay + 50*time.Millisecond)
	if got := state(); got != "available" {
		t.Fatalf("after SnapshotDelay: %s, want available", got)
	}
	run(t, s, 1, "ImageId", ami)
}

func TestCopySnapshotAcrossRegions(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{Regions: []string{"us-east-1", "eu-west-1"}, SnapshotDelay: time.Hour})
	vol := volumeIn(t, s, "us-east-1a", 2)
	pending := mustCall(t, s, "CreateSnapshot", "VolumeId", vol).root.get("snapshotId")
	wantError(t, callIn(t, s, "eu-west-1", "CopySnapshot", "SourceRegion", "us-east-1", "SourceSnapshotId", pending), 400, "IncorrectState")

	fast := newServer(t, Options{Regions: []string{"us-east-1", "eu-west-1"}})
	vol = volumeIn(t, fast, "us-east-1a", 2)
	snap := mustCall(t, fast, "CreateSnapshot", "VolumeId", vol, "Description", "orig").root.get("snapshotId")
	r := mustCallIn(t, fast, "eu-west-1", "CopySnapshot", "SourceRegion", "us-east-1", "SourceSnapshotId", snap,
		"DestinationRegion", "eu-west-1", "PresignedUrl", "https://ec2.us-east-1.amazonaws.com/?Action=CopySnapshot",
		"TagSpecification.1.ResourceType", "snapshot", "TagSpecification.1.Tag.1.Key", "k", "TagSpecification.1.Tag.1.Value", "v")
	cp := r.root.get("snapshotId")
	if cp == snap || r.root.get("tagSet/item/key") != "k" {
		t.Errorf("CopySnapshot answered %s", r.body)
	}
	d := mustCallIn(t, fast, "eu-west-1", "DescribeSnapshots", "Owner.1", "self")
	if got := d.root.texts("snapshotSet/item/snapshotId"); !slices.Equal(got, []string{cp}) ||
		d.root.get("snapshotSet/item/volumeSize") != "2" || d.root.get("snapshotSet/item/description") != "[Copied "+snap+" from us-east-1]" {
		t.Errorf("eu-west-1 snapshots: %s", d.body)
	}
	wantError(t, call(t, fast, "DescribeSnapshots", "SnapshotId.1", cp), 400, "InvalidSnapshot.NotFound")
	// A volume of the copy lives in the copy's region.
	mustCallIn(t, fast, "eu-west-1", "CreateVolume", "AvailabilityZone", "eu-west-1c", "SnapshotId", cp)
	wantError(t, call(t, fast, "CreateVolume", "AvailabilityZone", "us-east-1a", "SnapshotId", cp), 400, "InvalidSnapshot.NotFound")
	for _, tc := range []struct {
		kv   []string
		code string
	}{
		{[]string{"SourceSnapshotId", snap}, "MissingParameter"},
		{[]string{"SourceRegion", "us-west-2", "SourceSnapshotId", snap}, "InvalidParameterValue"},
		{[]string{"SourceRegion", "us-east-1", "SourceSnapshotId", "snap-0123456789abcdef0"}, "InvalidSnapshot.NotFound"},
		{[]string{"SourceRegion", "us-east-1", "SourceSnapshotId", snap, "DestinationRegion", "us-east-1"}, "InvalidParameterValue"},
	} {
		wantError(t, callIn(t, fast, "eu-west-1", "CopySnapshot", tc.kv...), 400, tc.code)
	}
	// A copy within one region is allowed, as on EC2.
	mustCall(t, fast, "CopySnapshot", "SourceRegion", "us-east-1", "SourceSnapshotId", snap)
}

func TestRegions(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{Regions: []string{"eu-west-1", "us-east-1"}, Zones: []string{"us-east-1b", "us-east-1d"}})
	wantError(t, callIn(t, s, "ap-south-1", "DescribeInstances"), 401, "AuthFailure")
	if got := s.Region("").Name(); got != "eu-west-1" {
		t.Errorf("default region %s, want the first of Regions", got)
	}

	zones := func(region string) []string {
		return mustCallIn(t, s, region, "DescribeAvailabilityZones").root.texts("availabilityZoneInfo/item/zoneName")
	}
	if got := zones("us-east-1"); !slices.Equal(got, []string{"us-east-1a", "us-east-1b", "us-east-1c"}) {
		t.Errorf("us-east-1 zones %v: Options.Zones is for the default region only", got)
	}
	if got := zones("eu-west-1"); !slices.Equal(got, []string{"us-east-1b", "us-east-1d"}) {
		t.Errorf("eu-west-1 zones %v, want Options.Zones", got)
	}

	key := b64(string(publicKey(t, "")))
	mustCallIn(t, s, "us-east-1", "ImportKeyPair", "KeyName", "ops", "PublicKeyMaterial", key)
	wantError(t, callIn(t, s, "eu-west-1", "RunInstances", "ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1", "KeyName", "ops"), 400, "InvalidKeyPair.NotFound")
	r := mustCallIn(t, s, "us-east-1", "RunInstances", "ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1", "KeyName", "ops", "ClientToken", "same-token")
	id := r.instanceIDs()[0]
	if got := r.root.get("instancesSet/item/placement/availabilityZone"); got != "us-east-1a" {
		t.Errorf("zone %s", got)
	}
	if got := r.root.get("instancesSet/item/privateDnsName"); !strings.HasSuffix(got, ".ec2.internal") {
		t.Errorf("us-east-1 private DNS %s", got)
	}
	wantError(t, callIn(t, s, "eu-west-1", "DescribeInstances", "InstanceId.1", id), 400, "InvalidInstanceID.NotFound")
	wantError(t, callIn(t, s, "eu-west-1", "TerminateInstances", "InstanceId.1", id), 400, "InvalidInstanceID.NotFound")
	// ClientTokens are per region too.
	other := mustCallIn(t, s, "eu-west-1", "RunInstances", "ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1", "ClientToken", "same-token")
	if got := other.root.get("instancesSet/item/privateDnsName"); !strings.HasSuffix(got, ".eu-west-1.compute.internal") {
		t.Errorf("eu-west-1 private DNS %s", got)
	}
	if len(s.Instances()) != 1 || s.Region("us-east-1").Instances()[0].ID != id || s.Region("us-east-1").Launches("same-token") != 1 {
		t.Errorf("per-region instances: default %+v, us-east-1 %+v", s.Instances(), s.Region("us-east-1").Instances())
	}
	vol := mustCallIn(t, s, "us-east-1", "CreateVolume", "AvailabilityZone", "us-east-1a", "Size", "1").root.get("volumeId")
	wantError(t, callIn(t, s, "eu-west-1", "DescribeVolumes", "VolumeId.1", vol), 400, "InvalidVolume.NotFound")
	wantError(t, callIn(t, s, "eu-west-1", "CreateTags", "ResourceId.1", vol, "Tag.1.Key", "k", "Tag.1.Value", "v"), 400, "InvalidVolume.NotFound")

	defer func() {
		if recover() == nil {
			t.Error("Region of a region not served did not panic")
		}
	}()
	s.Region("ap-south-1")
}

func TestTagsOnStorage(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{})
	id := run(t, s, 1).instanceIDs()[0]
	root := mustCall(t, s, "DescribeInstances").root.get("reservationSet/item/instancesSet/item/blockDeviceMapping/item/ebs/volumeId")
	vol := volumeIn(t, s, "us-east-1a", 1)
	snap := mustCall(t, s, "CreateSnapshot", "VolumeId", vol).root.get("snapshotId")
	ami := mustCall(t, s, "CreateImage", "InstanceId", id, "Name", "tagged").root.get("imageId")
	key := importKey(t, s, "k1").root.get("keyPairId")
	all := []string{id, root, vol, snap, ami, key}
	kv := []string{"Tag.1.Key", "a", "Tag.1.Value", "1", "Tag.2.Key", "b", "Tag.2.Value", "2", "Tag.3.Key", "c", "Tag.3.Value", ""}
	for i, r := range all {
		kv = append(kv, "ResourceId."+strconv.Itoa(i+1), r)
	}
	mustCall(t, s, "CreateTags", kv...)
	// DeleteTags: a with any value, b only with value 3 (it has 2), c only
	// with the empty value.
	del := []string{"Tag.1.Key", "a", "Tag.2.Key", "b", "Tag.2.Value", "3", "Tag.3.Key", "c", "Tag.3.Value", ""}
	for i, r := range all {
		del = append(del, "ResourceId."+strconv.Itoa(i+1), r)
	}
	mustCall(t, s, "DeleteTags", del...)
	tagsOf := map[string][]string{
		id:   mustCall(t, s, "DescribeInstances").root.texts("reservationSet/item/instancesSet/item/tagSet/item/key"),
		vol:  mustCall(t, s, "DescribeVolumes", "VolumeId.1", vol).root.texts("volumeSet/item/tagSet/item/key"),
		snap: mustCall(t, s, "DescribeSnapshots", "SnapshotId.1", snap).root.texts("snapshotSet/item/tagSet/item/key"),
		ami:  mustCall(t, s, "DescribeImages", "ImageId.1", ami).root.texts("imagesSet/item/tagSet/item/key"),
		key:  mustCall(t, s, "DescribeKeyPairs", "KeyPairId.1", key).root.texts("keySet/item/tagSet/item/key"),
	}
	for r, keys := range tagsOf {
		if !slices.Equal(keys, []string{"b"}) {
			t.Errorf("%s keeps tags %v, want [b]", r, keys)
		}
	}
	if got := s.Instances()[0].VolumeTags; len(got) != 1 || got["b"] != "2" {
		t.Errorf("root volume tags %v", got)
	}
	// No Tag at all deletes every tag.
	mustCall(t, s, "DeleteTags", "ResourceId.1", vol)
	if got := mustCall(t, s, "DescribeVolumes", "VolumeId.1", vol).root.texts("volumeSet/item/tagSet/item/key"); len(got) != 0 {
		t.Errorf("tags left %v", got)
	}
	for _, tc := range []struct{ id, code string }{
		{"snap-0123456789abcdef0", "InvalidSnapshot.NotFound"},
		{"ami-0123456789abcdef1", "InvalidAMIID.NotFound"},
		{"vol-0123456789abcdef0", "InvalidVolume.NotFound"},
		{"sg-0123456789abcdef0", "InvalidID"},
	} {
		wantError(t, call(t, s, "CreateTags", "ResourceId.1", tc.id, "Tag.1.Key", "k", "Tag.1.Value", "v"), 400, tc.code)
		wantError(t, call(t, s, "DeleteTags", "ResourceId.1", tc.id), 400, tc.code)
	}
}
