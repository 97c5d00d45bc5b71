package ec2

import (
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"golang.org/x/crypto/ssh"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/internal/clock"
)

// Keys made with ssh-keygen; their fingerprints as EC2 computes them for
// imported keys, worked out with the pipelines of EC2's documentation
// ("ssh-keygen -e -m PEM | openssl rsa -RSAPublicKey_in -outform DER |
// openssl md5 -c" for RSA, "ssh-keygen -l" for ed25519, which drops the
// base64 padding EC2 shows).
const (
	testRSAKey = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC57siS2QS15pXdqA2/iHRLiXqJPApu8n1L8SkjirxQ2pOsZCaYQptuDn3LxYuRYDhXx0uwbkRgPguKQamStchx0z5lustBcrDQEiNjj7YQJ5u4+7+RgThKZ7T7AbUQK7nKPbjcuIU9luBT2tUiyAroHvN8vsSUvthaiXujMMCt6ra5eM3xIa+QRF2EIvVxpk6xU1YRVV4d4Qoc/gZ4JM9XgkT4DsJ291CLb2d7OLE7YZjJE/ha83M9VD0J2EQkNOMK/Z0h2oYEwPSTNxO7wJH+fPreSz4diTnnNGycJFgBvjvCn3gIWS/eclK0wMkxO5O7ZDYDUeUUyK2cpgSheVDT root@vm"
	testRSAFP  = "20:2b:ca:7e:3b:07:f5:5c:af:22:8f:97:a1:ae:49:c8"
	// RFC 4716's fingerprint, "ssh-keygen -l -E md5".
	testRSALegacyFP = "97:b9:29:8f:0d:96:e2:28:f0:9e:4d:a3:d3:35:56:02"
	testEd25519Key  = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF8t4BbhouR4CE2rHyzMRrfrHqJsWiCfpNgdzVmjnzrb root@vm"
	testEd25519FP   = "cQLOogPAKMbyfEz1deTS/Ng48ndwT3sHLpqoUngGHMc="
)

func parseKey(t *testing.T, s string) ssh.PublicKey {
	t.Helper()
	k, _, _, _, err := ssh.ParseAuthorizedKey([]byte(s))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestImportFingerprints(t *testing.T) {
	for key, want := range map[string][]string{
		testRSAKey:     {testRSAFP, testRSALegacyFP},
		testEd25519Key: {testEd25519FP},
	} {
		got, err := importFingerprints(parseKey(t, key))
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("importFingerprints(%.20s…) = %q, %v; want %q", key, got, err, want)
		}
	}
	ecdsa := "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBOBXXM2uaJTCnBaI00BP+wt9W9evDICZhe0c/VPdy67gxnJSLGuO/1cIK6xkyQVmValLweHIwnEff4vmuS29zqo="
	if _, err := importFingerprints(parseKey(t, ecdsa)); err == nil || !strings.Contains(err.Error(), "only rsa and ed25519") {
		t.Errorf("ecdsa key: %v", err)
	}
}

func TestSameKey(t *testing.T) {
	rsa, ed := parseKey(t, testRSAKey), parseKey(t, testEd25519Key)
	tests := []struct {
		name    string
		info    types.KeyPairInfo
		want    ssh.PublicKey
		same    bool
		errWith string
	}{
		{"stored key, other comment", types.KeyPairInfo{PublicKey: aws.String(strings.Replace(testEd25519Key, "root@vm", "hangar", 1))}, ed, true, ""},
		{"stored key differs", types.KeyPairInfo{PublicKey: aws.String(testRSAKey)}, ed, false, ""},
		{"stored key unreadable", types.KeyPairInfo{PublicKey: aws.String("ssh-ed25519 !!!")}, ed, false, "parsing the public key EC2 holds"},
		{"rsa fingerprint", types.KeyPairInfo{KeyFingerprint: aws.String(testRSAFP)}, rsa, true, ""},
		{"rsa rfc 4716 fingerprint", types.KeyPairInfo{KeyFingerprint: aws.String(testRSALegacyFP)}, rsa, true, ""},
		{"rsa fingerprint upper case", types.KeyPairInfo{KeyFingerprint: aws.String(strings.ToUpper(testRSAFP))}, rsa, true, ""},
		{"ed25519 fingerprint", types.KeyPairInfo{KeyFingerprint: aws.String(testEd25519FP)}, ed, true, ""},
		{"ed25519 fingerprint unpadded", types.KeyPairInfo{KeyFingerprint: aws.String(strings.TrimRight(testEd25519FP, "="))}, ed, true, ""},
		{"fingerprint of another key", types.KeyPairInfo{KeyFingerprint: aws.String(testRSAFP)}, ed, false, ""},
		{"nothing to compare", types.KeyPairInfo{}, ed, false, "cannot be compared"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			same, err := sameKey(tc.info, tc.want)
			if tc.errWith != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errWith) {
					t.Fatalf("sameKey error %v, want one saying %q", err, tc.errWith)
				}
				return
			}
			if err != nil || same != tc.same {
				t.Errorf("sameKey = %v, %v; want %v", same, err, tc.same)
			}
		})
	}
}

func TestRegisterInput(t *testing.T) {
	two := []cloud.BlockDevice{{Device: "/dev/xvda", SnapshotID: "snap-1", SizeGB: 20}, {Device: "/dev/sdf", SnapshotID: "snap-2"}}
	t.Run("defaults", func(t *testing.T) {
		in, err := registerInput(cloud.ImageSpec{Name: "img", Devices: two, Tags: map[string]string{"k": "v"}})
		if err != nil {
			t.Fatal(err)
		}
		if in.Architecture != "x86_64" || aws.ToString(in.RootDeviceName) != "/dev/xvda" ||
			aws.ToString(in.VirtualizationType) != "hvm" || !aws.ToBool(in.EnaSupport) {
			t.Errorf("arch %q root %q virt %q ena %v", in.Architecture, aws.ToString(in.RootDeviceName), aws.ToString(in.VirtualizationType), aws.ToBool(in.EnaSupport))
		}
		if len(in.BlockDeviceMappings) != 2 {
			t.Fatalf("%d mappings, want 2", len(in.BlockDeviceMappings))
		}
		for i, m := range in.BlockDeviceMappings {
			e := m.Ebs
			if aws.ToString(m.DeviceName) != two[i].Device || aws.ToString(e.SnapshotId) != two[i].SnapshotID ||
				!aws.ToBool(e.DeleteOnTermination) || e.VolumeType != types.VolumeTypeGp3 {
				t.Errorf("mapping %d = %s %+v", i, aws.ToString(m.DeviceName), *e)
			}
		}
		if aws.ToInt32(in.BlockDeviceMappings[0].Ebs.VolumeSize) != 20 || in.BlockDeviceMappings[1].Ebs.VolumeSize != nil {
			t.Error("sizes not as given (0 must leave the snapshot's size)")
		}
		if len(in.TagSpecifications) != 1 || in.TagSpecifications[0].ResourceType != types.ResourceTypeImage {
			t.Errorf("tag specifications %+v, want the image's", in.TagSpecifications)
		}
	})
	t.Run("given root and architecture", func(t *testing.T) {
		in, err := registerInput(cloud.ImageSpec{Name: "img", Devices: two, RootDevice: "/dev/sdf", Architecture: "arm64"})
		if err != nil {
			t.Fatal(err)
		}
		if in.Architecture != "arm64" || aws.ToString(in.RootDeviceName) != "/dev/sdf" {
			t.Errorf("arch %q root %q", in.Architecture, aws.ToString(in.RootDeviceName))
		}
	})
	t.Run("bad specs", func(t *testing.T) {
		_, err := registerInput(cloud.ImageSpec{RootDevice: "/dev/sdz", Devices: []cloud.BlockDevice{
			{SnapshotID: "snap-1"}, {Device: "/dev/xvda"}, {Device: "/dev/sdb", SnapshotID: "snap-2", SizeGB: -1},
			{Device: "/dev/xvda", SnapshotID: "snap-3"},
		}})
		want := `registering ec2 image "": no name given
device 1: no device name
device /dev/xvda: no snapshot
device /dev/sdb: size -1 GB is not between 1 and 65536
device /dev/xvda given twice
root device /dev/sdz is not one of the devices`
		if err == nil || err.Error() != want {
			t.Errorf("error:\n%v\nwant:\n%s", err, want)
		}
		if _, err := registerInput(cloud.ImageSpec{Name: "img"}); err == nil || !strings.Contains(err.Error(), "no devices given") {
			t.Errorf("no devices: %v", err)
		}
	})
}

func TestEC2Token(t *testing.T) {
	long := strings.Repeat("x", 65)
	tests := []struct {
		in, want string
		hashed   bool
	}{
		{"", "", false},
		{"stage-1", "stage-1", false},
		{strings.Repeat("y", 64), strings.Repeat("y", 64), false},
		{long, "", true},
		{"with space", "", true},
		{"ünïcode", "", true},
	}
	for _, tc := range tests {
		got := aws.ToString(ec2Token(tc.in))
		if tc.hashed {
			if !strings.HasPrefix(got, "hangar-") || len(got) > 64 || got != aws.ToString(ec2Token(tc.in)) {
				t.Errorf("ec2Token(%q) = %q, want a stable hash within 64 characters", tc.in, got)
			}
			continue
		}
		if got != tc.want {
			t.Errorf("ec2Token(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
	if aws.ToString(ec2Token(long)) == aws.ToString(ec2Token(long+"z")) {
		t.Error("two long tokens hash alike")
	}
}

func TestStorageStates(t *testing.T) {
	for in, want := range map[types.VolumeState]string{
		"creating": cloud.VolumeCreating, "available": cloud.VolumeAvailable, "in-use": cloud.VolumeInUse,
		"deleting": cloud.VolumeDeleting, "deleted": cloud.VolumeDeleting, "error": cloud.VolumeError, "new-one": "new-one",
	} {
		if got := volumeState(in); got != want {
			t.Errorf("volumeState(%q) = %q, want %q", in, got, want)
		}
	}
	for in, want := range map[types.SnapshotState]string{
		"pending": cloud.SnapshotPending, "recovering": cloud.SnapshotPending, "completed": cloud.SnapshotCompleted,
		"error": cloud.SnapshotError, "recoverable": "recoverable",
	} {
		if got := snapshotState(in); got != want {
			t.Errorf("snapshotState(%q) = %q, want %q", in, got, want)
		}
	}
	for in, want := range map[types.ImageState]string{
		"pending": cloud.ImagePending, "transient": cloud.ImagePending, "available": cloud.ImageAvailable,
		"failed": cloud.ImageFailed, "error": cloud.ImageFailed, "invalid": cloud.ImageFailed,
		"deregistered": "deregistered", "disabled": "disabled",
	} {
		if got := imageState(in); got != want {
			t.Errorf("imageState(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestToCloudImage(t *testing.T) {
	got := toCloudImage(types.Image{
		ImageId: aws.String("ami-1"), Name: aws.String("n"), State: types.ImageStateAvailable,
		Architecture: types.ArchitectureValuesArm64, RootDeviceName: aws.String("/dev/xvda"),
		CreationDate: aws.String("2026-02-03T04:05:06.000Z"),
		Tags:         []types.Tag{{Key: aws.String("k"), Value: aws.String("v")}},
		BlockDeviceMappings: []types.BlockDeviceMapping{
			{DeviceName: aws.String("/dev/xvda"), Ebs: &types.EbsBlockDevice{SnapshotId: aws.String("snap-1"), VolumeSize: aws.Int32(8)}},
			{DeviceName: aws.String("/dev/sdb"), VirtualName: aws.String("ephemeral0")},
			{DeviceName: aws.String("/dev/sdc"), Ebs: &types.EbsBlockDevice{VolumeSize: aws.Int32(100)}},
		},
	})
	want := cloud.Image{
		ID: "ami-1", Name: "n", State: cloud.ImageAvailable, Architecture: "arm64", RootDevice: "/dev/xvda",
		CreatedAt: time.Date(2026, 2, 3, 4, 5, 6, 0, time.UTC), Tags: map[string]string{"k": "v"},
		Devices: []cloud.BlockDevice{{Device: "/dev/xvda", SnapshotID: "snap-1", SizeGB: 8}, {Device: "/dev/sdc", SizeGB: 100}},
	}
	if got.ID != want.ID || got.Name != want.Name || got.State != want.State || got.Architecture != want.Architecture ||
		got.RootDevice != want.RootDevice || !got.CreatedAt.Equal(want.CreatedAt) || !maps.Equal(got.Tags, want.Tags) ||
		!slices.Equal(got.Devices, want.Devices) {
		t.Errorf("toCloudImage =\n%+v\nwant\n%+v", got, want)
	}
}

func TestToVolumeAttachment(t *testing.T) {
	v := toVolume(types.Volume{VolumeId: aws.String("vol-1"), State: types.VolumeStateInUse, Attachments: []types.VolumeAttachment{
		{InstanceId: aws.String("i-old"), Device: aws.String("/dev/sdf"), State: types.VolumeAttachmentStateDetached},
		{InstanceId: aws.String("i-new"), Device: aws.String("/dev/sdg"), State: types.VolumeAttachmentStateAttaching},
	}})
	if v.InstanceID != "i-new" || v.Device != "/dev/sdg" || v.AttachmentState != "attaching" || v.State != cloud.VolumeInUse {
		t.Errorf("toVolume = %+v, want the live attachment to i-new", v)
	}
}

func TestStorageFilters(t *testing.T) {
	got := filters("volume-id", cloud.Filter{IDs: []string{"vol-1", "vol-2"}, Tags: map[string]string{"b": "x*y", "a": "1"}})
	var flat []string
	for _, f := range got {
		flat = append(flat, aws.ToString(f.Name)+"="+strings.Join(f.Values, ","))
	}
	if want := []string{"volume-id=vol-1,vol-2", "tag:a=1", `tag:b=x\*y`}; !slices.Equal(flat, want) {
		t.Errorf("filters = %q, want %q", flat, want)
	}
	if got := filters("image-id", cloud.Filter{}); got != nil {
		t.Errorf("empty filter gave %+v", got)
	}
	if !matches("vol-1", map[string]string{"a": "1"}, cloud.Filter{IDs: []string{"vol-1"}, Tags: map[string]string{"a": "1"}}) ||
		matches("vol-3", map[string]string{"a": "1"}, cloud.Filter{IDs: []string{"vol-1"}}) ||
		matches("vol-1", map[string]string{"a": "2"}, cloud.Filter{Tags: map[string]string{"a": "1"}}) {
		t.Error("matches does not re-check ids and tags")
	}
}

func TestStorageErrorClasses(t *testing.T) {
	for code, class := range map[string]error{
		"InvalidVolume.NotFound":                cloud.ErrNotFound,
		"InvalidVolumeID.Malformed":             cloud.ErrNotFound,
		"InvalidSnapshot.NotFound":              cloud.ErrNotFound,
		"InvalidSnapshotID.Malformed":           cloud.ErrNotFound,
		"InvalidAMIID.NotFound":                 cloud.ErrNotFound,
		"InvalidAMIID.Unavailable":              cloud.ErrNotFound,
		"InvalidKeyPair.NotFound":               cloud.ErrNotFound,
		"InvalidKeyPair.Duplicate":              nil,
		"VolumeLimitExceeded":                   cloud.ErrQuota,
		"SnapshotLimitExceeded":                 cloud.ErrQuota,
		"ResourceLimitExceeded":                 cloud.ErrQuota,
		"InsufficientVolumeCapacity":            cloud.ErrCapacity,
		"SnapshotCreationPerVolumeRateExceeded": cloud.ErrThrottled,
		"IncorrectState":                        nil,
	} {
		err := wrapErr("deleting ec2 volume vol-1", apiErr(400, code, "m"))
		for _, c := range []error{cloud.ErrCapacity, cloud.ErrQuota, cloud.ErrThrottled, cloud.ErrNotFound} {
			if got := errors.Is(err, c); got != errors.Is(c, class) {
				t.Errorf("%s: errors.Is(%v) = %v", code, c, got)
			}
		}
	}
}

// TestStorageRateLimitClasses: every storage action waits on a bucket of
// its category, and none on an instance bucket.
func TestStorageRateLimitClasses(t *testing.T) {
	limits := DefaultRateLimits()
	for _, action := range []string{"DescribeKeyPairs", "DescribeVolumes", "DescribeSnapshots", "DescribeImages"} {
		if got := requestLimit(limits, action); got != limits.NonMutating {
			t.Errorf("%s: bucket %+v, want the non-mutating one", action, got)
		}
	}
	l := newLimiter(limits, clock.Real)
	for _, action := range []string{"ImportKeyPair", "CreateVolume", "AttachVolume", "DetachVolume", "DeleteVolume",
		"CreateSnapshot", "DeleteSnapshot", "CopySnapshot", "CreateImage", "RegisterImage", "CopyImage", "DeregisterImage"} {
		if got := requestLimit(limits, action); got != limits.Mutating {
			t.Errorf("%s: bucket %+v, want the mutating one", action, got)
		}
		if l.resourceBucket(action) != nil {
			t.Errorf("%s has an instance bucket", action)
		}
	}
}

func TestPublicIPMapping(t *testing.T) {
	in := toInstance(types.Instance{InstanceId: aws.String("i-1"), PrivateIpAddress: aws.String("10.0.0.5"), PublicIpAddress: aws.String("203.0.113.7")})
	if in.PublicIP != "203.0.113.7" || in.PrivateIP != "10.0.0.5" {
		t.Errorf("toInstance = %+v", in)
	}
	if in := toInstance(types.Instance{InstanceId: aws.String("i-2")}); in.PublicIP != "" {
		t.Errorf("no public address mapped to %q", in.PublicIP)
	}
}
