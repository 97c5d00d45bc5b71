package staging_test

import (
	"bytes"
	"context"
	"os"
	"os/user"
	"path/filepath"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/credentials"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/ec2"
	"github.com/hangar-ci/hangar/cloud/ec2/ec2test"
	"github.com/hangar-ci/hangar/cloud/local"
	"github.com/hangar-ci/hangar/cloud/staging"
)

// TestStagingOnEC2API runs the engine through the real aws-sdk-go-v2 client
// against ec2test, whose instances and volumes are the local cloud's, so
// the data really moves: reuse by name, snapshot, grow, and the cloud's own
// CopySnapshot and CopyImage between two regions.
func TestStagingOnEC2API(t *testing.T) {
	needStagingTools(t)
	dir := t.TempDir()
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(dir, "aws-config"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(dir, "aws-credentials"))
	for _, k := range []string{"AWS_PROFILE", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2", "AWS_CA_BUNDLE"} {
		t.Setenv(k, "")
	}
	ctx := context.Background()
	backend, err := local.New(ctx, local.Options{Dir: filepath.Join(dir, "backend")})
	if err != nil {
		t.Fatal(err)
	}
	srv := ec2test.New(ec2test.Options{Backend: backend, Regions: []string{"us-east-1", "eu-west-1"}, SnapshotDelay: 300 * time.Millisecond})
	t.Cleanup(func() {
		srv.Close()
		insts, _ := backend.List(ctx, nil)
		var ids []string
		for _, in := range insts {
			ids = append(ids, in.ID)
		}
		_, _ = backend.Terminate(ctx, ids)
		_ = backend.Close()
	})
	u, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	out := &bytes.Buffer{}
	managers := map[string]*staging.Manager{}
	var open func(ctx context.Context, region string) (*staging.Manager, error)
	open = func(ctx context.Context, region string) (*staging.Manager, error) {
		if m := managers[region]; m != nil {
			return m, nil
		}
		p, err := ec2.New(ctx, ec2.Options{
			Region:      region,
			Endpoint:    srv.URL(),
			Credentials: credentials.NewStaticCredentialsProvider("AKIDSTAGING", "staging-secret", ""),
			SSHPort:     backend.Capabilities().SSHPort,
		})
		if err != nil {
			return nil, err
		}
		m, err := staging.New(ctx, staging.Options{
			Provider: p, ProviderName: "aws", Dir: filepath.Join(dir, "staging"),
			Image: ec2test.DefaultImageID, InstanceType: "t3.small", User: u.Username,
			OnExit: staging.OnExitTerminate, ReadyTimeout: time.Minute,
			OtherRegion: open, Progress: out,
		})
		if err != nil {
			return nil, err
		}
		t.Cleanup(func() {
			if err := m.Close(context.WithoutCancel(ctx)); err != nil {
				t.Errorf("closing the staging manager of %s: %v", region, err)
			}
			_ = p.Close() // only idle connections to the test server
		})
		managers[region] = m
		return m, nil
	}
	defer func() {
		if t.Failed() {
			t.Logf("manager output:\n%s", out)
		}
	}()
	m, err := open(ctx, "us-east-1")
	if err != nil {
		t.Fatal(err)
	}

	v, _, err := m.ProvisionVolume(ctx, staging.VolumeSpec{Name: "deps", SizeGB: 2})
	if err != nil {
		t.Fatal(err)
	}
	if v.Cloud.Zone != "us-east-1a" || v.Cloud.State != cloud.VolumeInUse {
		t.Fatalf("volume: %+v", v.Cloud)
	}
	src := t.TempDir()
	writeTree(t, src)
	if err := m.Rsync(ctx, nil, src+"/", "vol:deps:/"); err != nil {
		t.Fatal(err)
	}
	snap, err := m.Snapshot(ctx, "deps", "")
	if err != nil {
		t.Fatal(err)
	}
	if err := m.DeleteVolume(ctx, "deps"); err != nil {
		t.Fatal(err)
	}
	v, _, err = m.ProvisionVolume(ctx, staging.VolumeSpec{Name: "deps", SizeGB: 4})
	if err != nil {
		t.Fatal(err)
	}
	if v.Cloud.SnapshotID != snap.ID || v.Cloud.SizeGB != 4 {
		t.Fatalf("reused volume: snapshot %q, %d GB; want %s, 4 GB", v.Cloud.SnapshotID, v.Cloud.SizeGB, snap.ID)
	}
	got := t.TempDir()
	if err := m.Rsync(ctx, nil, "vol:deps:/", got); err != nil {
		t.Fatal(err)
	}
	if digest(t, got) != digest(t, src) {
		t.Fatal("volume made from the snapshot differs")
	}

	eu, err := m.InRegion(ctx, "eu-west-1")
	if err != nil {
		t.Fatal(err)
	}
	cp, err := m.CopySnapshot(ctx, snap.ID, eu)
	if err != nil {
		t.Fatal(err)
	}
	if cp.State != cloud.SnapshotCompleted || cp.Tags[staging.TagName] != "deps" {
		t.Fatalf("copied snapshot: %+v", cp)
	}
	if _, _, err := eu.ProvisionVolume(ctx, staging.VolumeSpec{Name: "deps", SizeGB: 2}); err != nil {
		t.Fatal(err)
	}
	got = t.TempDir()
	if err := eu.Rsync(ctx, nil, "vol:deps:/", got); err != nil {
		t.Fatal(err)
	}
	if digest(t, got) != digest(t, src) {
		t.Fatal("volume made from the copied snapshot differs")
	}

	img, err := m.Storage().RegisterImage(ctx, cloud.ImageSpec{Name: "builder",
		Devices: []cloud.BlockDevice{{Device: "/dev/xvda", SnapshotID: snap.ID}}})
	if err != nil {
		t.Fatal(err)
	}
	copied, err := m.CopyImage(ctx, img.ID, eu)
	if err != nil {
		t.Fatal(err)
	}
	if copied.Name != "builder" || copied.State != cloud.ImageAvailable || len(copied.Devices) != 1 || copied.Devices[0].SnapshotID == snap.ID {
		t.Fatalf("copied image: %+v", copied)
	}
	if _, err := os.Stat(got); err != nil {
		t.Fatal(err)
	}
}
