package main

import (
	"context"
	"fmt"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/staging"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
)

var bakedID = regexp.MustCompile(`^ami-[0-9a-f]{17}\n$`)

// bakedImages lists the images baked for poolName on the test's local cloud.
func bakedImages(t *testing.T, ts *testServer, poolName string) []cloud.Image {
	t.Helper()
	st, _ := cloud.StorageOf(ts.localProvider(t))
	imgs, err := pool.BakedImages(context.Background(), st, poolName)
	if err != nil {
		t.Fatal(err)
	}
	return imgs
}

// noStagingServers fails if a staging server is left on p.
func noStagingServers(t *testing.T, p cloud.Provider) {
	t.Helper()
	list, err := p.List(context.Background(), map[string]string{staging.TagRole: "server"})
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range list {
		if in.State != cloud.StateTerminated {
			t.Errorf("staging server %s left %s", in.ID, in.State)
		}
	}
}

// hangar image bake: the script's work is on the pool's next instances,
// --roll replaces the idle ones at once, keep prunes, and a failed script
// leaves no image and no server and ends with its status.
func TestImageBake(t *testing.T) {
	needStaging(t)
	dir := t.TempDir()
	bake := filepath.Join(dir, "bake.sh")
	writeFile(t, bake, "set -e\necho baking version ${BAKE_N:-1}\nmkdir -p \"$HANGAR_ROOT/opt/tool\"\ndate +%s%N > \"$HANGAR_ROOT/opt/tool/stamp\"\n")
	broken := filepath.Join(dir, "broken.sh")
	writeFile(t, broken, "echo half done\nexit 3\n")
	cfg := testTOML(filepath.Join(dir, "data"), "demo", "min_idle = 1\nmax_instances = 2\n[pools.demo.bake]\nscript = "+strconv.Quote(bake)+"\nkeep = 2\n"+
		"[pools.broken]\nprovider = \"local\"\nworker_command = \"sleep 600\"\n[pools.broken.bake]\nscript = "+strconv.Quote(broken)+"\n")
	cfgPath := filepath.Join(dir, "hangar.toml")
	writeFile(t, cfgPath, cfg)
	ts := startTest(t, cfg, nil)
	srv := "--server=" + ts.url
	testutil.Eventually(t, "an idle instance", 30*time.Second, func() bool { return ts.countState(t, "demo", pool.Idle) == 1 })
	before := ts.instances(t, "demo")[0]

	code, out, errOut := runCLI(t, srv, "image", "bake", "demo", "--config", cfgPath, "--roll")
	if code != 0 || !bakedID.MatchString(out) {
		t.Fatalf("bake: exit %d, stdout %q; stderr:\n%s", code, out, errOut)
	}
	t.Logf("bake:\n%s", errOut)
	image := strings.TrimSpace(out)
	for _, want := range []string{"boot: ", "script: ", "baking version 1", "stop: ", "snapshot and register: image hangar-demo-", "server: pool demo launches from " + image + "; 1 idle instances on older images replaced"} {
		if !strings.Contains(errOut, want) {
			t.Errorf("bake's progress lacks %q:\n%s", want, errOut)
		}
	}
	noStagingServers(t, ts.localProvider(t))
	imgs := bakedImages(t, ts, "demo")
	if len(imgs) != 1 || imgs[0].ID != image || !regexp.MustCompile(`^hangar-demo-\d{8}-\d{6}$`).MatchString(imgs[0].Name) {
		t.Fatalf("baked images %+v, want %s named hangar-demo-YYYYMMDD-HHMMSS", imgs, image)
	}
	// The idle instance from before is replaced by one on the new image,
	// and a build finds what the script installed.
	waitGone(t, ts, before.ID)
	code, out, errOut = runCLI(t, srv, "run", "demo", "--", "sh", "-c", `cat "$HANGAR_ROOT/opt/tool/stamp"`)
	if code != 0 || out == "" {
		t.Fatalf("run on the baked image: exit %d %q; stderr:\n%s", code, out, errOut)
	}
	for _, in := range ts.instances(t, "demo") {
		if in.Image != image {
			t.Errorf("instance %s launched from %q, want %s", in.ID, in.Image, image)
		}
	}

	// keep = 2: two more bakes leave the two newest.
	var newest []string
	for range 2 {
		code, out, errOut = runCLI(t, srv, "image", "bake", "demo", "--config", cfgPath)
		if code != 0 {
			t.Fatalf("bake: exit %d; stderr:\n%s", code, errOut)
		}
		newest = append([]string{strings.TrimSpace(out)}, newest...)
	}
	var ids []string
	for _, im := range bakedImages(t, ts, "demo") {
		ids = append(ids, im.ID)
	}
	// The first image stays while an instance runs from it.
	if len(ids) < 2 || ids[0] != newest[0] || ids[1] != newest[1] {
		t.Errorf("images after three bakes: %v, want the newest two %v first", ids, newest)
	}
	code, out, errOut = runCLI(t, srv, "image", "list", "--config", cfgPath, "--pool", "demo")
	if code != 0 || !strings.Contains(out, newest[0]) || !strings.Contains(out, "hangar-demo-") {
		t.Errorf("image list: exit %d %q %q", code, out, errOut)
	}

	// A failing script: its status, no image, no server.
	code, out, errOut = runCLI(t, srv, "image", "bake", "broken", "--config", cfgPath)
	if code != 3 || out != "" || !strings.Contains(errOut, "half done") || !strings.Contains(errOut, "failed with status 3; no image made") {
		t.Errorf("failed bake: exit %d, stdout %q; stderr:\n%s", code, out, errOut)
	}
	if imgs := bakedImages(t, ts, "broken"); len(imgs) != 0 {
		t.Errorf("a failed bake left images %+v", imgs)
	}
	noStagingServers(t, ts.localProvider(t))
}

// The same bake through the EC2 provider, on ec2test whose instances and
// images are the local cloud's: the staging server is an EC2 instance, the
// image EC2's CreateImage, and the pool's next instance boots from it.
func TestEC2ImageBake(t *testing.T) {
	needStaging(t)
	srv, _ := ec2Cloud(t)
	dir := t.TempDir()
	bake := filepath.Join(dir, "bake.sh")
	writeFile(t, bake, `mkdir -p "$HANGAR_ROOT/opt/tool" && echo baked > "$HANGAR_ROOT/opt/tool/stamp"`+"\n")
	me, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	cfg := ec2TOML(filepath.Join(dir, "data"), srv.URL(), "max_instances = 1\n[pools.ci.bake]\nscript = "+strconv.Quote(bake)+"\n") +
		"\n[providers.east.staging]\nuser = " + strconv.Quote(me.Username) + "\n"
	// The local cloud's sshd listens on its own port.
	cfg = replaceOnce(cfg, "[providers.east]\n", "[providers.east]\nssh_port = 2222\n")
	cfgPath := filepath.Join(dir, "hangar.toml")
	writeFile(t, cfgPath, cfg)
	ts := startTest(t, cfg, nil)

	code, out, errOut := runCLI(t, "--server="+ts.url, "image", "bake", "ci", "--config", cfgPath)
	if code != 0 || !regexp.MustCompile(`^ami-[0-9a-f]+\n$`).MatchString(out) {
		t.Fatalf("bake on EC2: exit %d, stdout %q; stderr:\n%s", code, out, errOut)
	}
	image := strings.TrimSpace(out)
	code, out, errOut = runCLI(t, "--server="+ts.url, "run", "ci", "--", "sh", "-c", `cat "$HANGAR_ROOT/opt/tool/stamp"`)
	if code != 0 || out != "baked\n" {
		t.Fatalf("run on the baked EC2 image: exit %d %q; stderr:\n%s", code, out, errOut)
	}
	id := find(t, instanceInNote, errOut)
	for _, in := range srv.Instances() {
		if in.ID == id && in.Image != image {
			t.Errorf("instance %s launched from %s, want %s", id, in.Image, image)
		}
		if in.Tags[staging.TagRole] == "server" && in.State != "terminated" {
			t.Errorf("staging server %s left %s", in.ID, in.State)
		}
	}
}

// A pool in another region with image = "bake:POOL" launches from a copy of
// that pool's newest baked image, made the first time a lease needs it
// (the lease waits for it) and again after the next bake.
func TestBakedImageCopiedToAnotherRegion(t *testing.T) {
	needStaging(t)
	ts, cfgPath := twoRegions(t, `mkdir -p "$HANGAR_ROOT/opt/tool" && date +%s%N > "$HANGAR_ROOT/opt/tool/stamp"`+"\n", "bake:build")
	srv := "--server=" + ts.url
	far := func() pool.PoolView {
		t.Helper()
		pools, err := ts.client.Pools(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range pools {
			if p.Name == "far" {
				return p
			}
		}
		t.Fatal("no pool far")
		return pool.PoolView{}
	}
	// Run looks for the image as it starts, after the API answers.
	testutil.Eventually(t, "far to wait for a baked image", 30*time.Second, func() bool {
		return strings.Contains(far().ImageCopy, "waiting for pool build to have a baked image")
	})
	if p := far(); p.Image != "" || !strings.Contains(p.ImageCopy, "waiting for pool build to have a baked image") {
		t.Errorf("far before any bake: %+v", p)
	}

	code, out, errOut := runCLI(t, srv, "image", "bake", "build", "--config", cfgPath)
	if code != 0 {
		t.Fatalf("bake: exit %d; stderr:\n%s", code, errOut)
	}
	baked := strings.TrimSpace(out)
	// A build on far waits for the copy, then finds what the bake made.
	code, out, errOut = runCLI(t, srv, "run", "far", "--wait", "3m", "--", "sh", "-c", `cat "$HANGAR_ROOT/opt/tool/stamp"`)
	if code != 0 || out == "" {
		t.Fatalf("run on far: exit %d %q; stderr:\n%s", code, out, errOut)
	}
	copied := far().Image
	if copied == "" || copied == baked {
		t.Fatalf("far launches from %q, want a copy of %s in its region", copied, baked)
	}
	there, err := ts.images.Region(context.Background(), "there", "eu-test")
	if err != nil {
		t.Fatal(err)
	}
	st, _ := cloud.StorageOf(there)
	imgs, err := st.Images(context.Background(), cloud.Filter{IDs: []string{copied}})
	if err != nil || len(imgs) != 1 || imgs[0].Tags[staging.TagCopiedFrom] != "local/"+baked {
		t.Fatalf("the copy %s: %+v, %v; want it tagged as copied from local/%s", copied, imgs, err, baked)
	}
	for _, in := range ts.instances(t, "far") {
		if in.Image != copied {
			t.Errorf("far's instance %s launched from %q, want %s", in.ID, in.Image, copied)
		}
	}

	// A newer bake is copied again.
	if code, _, errOut = runCLI(t, srv, "image", "bake", "build", "--config", cfgPath); code != 0 {
		t.Fatalf("second bake: exit %d; stderr:\n%s", code, errOut)
	}
	testutil.Eventually(t, "far to launch from a copy of the new bake", 3*time.Minute, func() bool {
		p := far()
		return p.Image != "" && p.Image != copied && p.ImageCopy == ""
	})
	noStagingServers(t, ts.providers["here"])
	noStagingServers(t, there)
}

// image = "PATTERN@REGION": the newest image of that name in the other
// region of the pool's provider, copied here before the first launch.
func TestImageFromAnotherRegionByName(t *testing.T) {
	needStaging(t)
	ts, cfgPath := twoRegions(t, `mkdir -p "$HANGAR_ROOT/opt/tool" && echo from-local > "$HANGAR_ROOT/opt/tool/stamp"`+"\n", "hangar-build-*@local")
	srv := "--server=" + ts.url
	if code, _, errOut := runCLI(t, srv, "image", "bake", "build", "--config", cfgPath); code != 0 {
		t.Fatalf("bake: exit %d; stderr:\n%s", code, errOut)
	}
	code, out, errOut := runCLI(t, srv, "run", "far", "--wait", "3m", "--", "sh", "-c", `cat "$HANGAR_ROOT/opt/tool/stamp"`)
	if code != 0 || out != "from-local\n" {
		t.Fatalf("run on far: exit %d %q; stderr:\n%s", code, out, errOut)
	}
}

// twoRegions starts a server with pool build (with [bake], running bake)
// on the local cloud's default region and pool far on region eu-test,
// whose image is farImage; it returns the server and the config's path.
func twoRegions(t *testing.T, bake, farImage string) (*testServer, string) {
	t.Helper()
	dir := t.TempDir()
	dataDir := filepath.Join(dir, "data")
	t.Cleanup(func() { terminateAll(t, filepath.Join(dataDir, "local", "regions", "eu-test")) })
	script := filepath.Join(dir, "bake.sh")
	writeFile(t, script, bake)
	cfg := fmt.Sprintf(`
[server]
listen = "127.0.0.1:0"
data_dir = %q
reconcile_interval = "1s"

[providers.here]
type = "local"

[providers.there]
type = "local"
region = "eu-test"

[pools.build]
provider = "here"
worker_command = %q
[pools.build.bake]
script = %q

[pools.far]
provider = "there"
image = %q
max_instances = 1
worker_command = %q
`, dataDir, workerCommand, script, farImage, workerCommand)
	cfgPath := filepath.Join(dir, "hangar.toml")
	writeFile(t, cfgPath, cfg)
	return startTest(t, cfg, nil), cfgPath
}
