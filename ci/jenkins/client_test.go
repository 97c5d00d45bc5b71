package jenkins

import (
	"context"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/hangar-ci/hangar/ci/jenkins/jenkinstest"
)

func TestQueueItemLabel(t *testing.T) {
	tests := []struct {
		name string
		item QueueItem
		want string
	}{
		{"freestyle labelExpression", QueueItem{Task: Task{LabelExpression: "hangar-linux"}, Why: "In the quiet period. Expires in 4.9 sec"}, "hangar-linux"},
		{"label expression as is", QueueItem{Task: Task{LabelExpression: "linux && docker"}}, "linux && docker"},
		{"the why's label before the job's", QueueItem{Task: Task{LabelExpression: "linux"}, Why: "All nodes of label ‘hangar-linux’ are offline"}, "hangar-linux"},
		{"a why in German", QueueItem{Task: Task{LabelExpression: "hangar-linux"}, Why: "Warte auf den nächsten freien Build-Prozessor auf ‘hangar-linux’"}, "hangar-linux"},
		{"no nodes", QueueItem{Why: "There are no nodes with the label ‘hangar-linux’"}, "hangar-linux"},
		{"all offline", QueueItem{Why: "All nodes of label ‘hangar-linux’ are offline"}, "hangar-linux"},
		{"busy", QueueItem{Why: "Waiting for next available executor on ‘hangar-linux’"}, "hangar-linux"},
		{"plain quotes of older controllers", QueueItem{Why: "All nodes of label 'hangar-linux' are offline"}, "hangar-linux"},
		{"any executor", QueueItem{Why: "Waiting for next available executor"}, ""},
		{"blocked", QueueItem{Why: "Build #12 is already in progress (ETA: 3 min 2 sec)"}, ""},
		{"a node's name", QueueItem{Why: "‘hangar-ci-abc’ is offline"}, ""},
		{"nothing", QueueItem{}, ""},
	}
	for _, tt := range tests {
		if got := tt.item.Label(); got != tt.want {
			t.Errorf("%s: Label() = %q, want %q", tt.name, got, tt.want)
		}
	}
}

func TestDetail(t *testing.T) {
	tests := []struct{ body, want string }{
		{"<html><head><title>Error 401 Invalid password/token for user: x</title></head></html>", "Error 401 Invalid password/token for user: x"},
		{"plain reason\nmore", "plain reason"},
		{"<html><body>no title</body></html>", ""},
		{strings.Repeat("x", 300), strings.Repeat("x", 200) + "…"},
	}
	for _, tt := range tests {
		if got := detail([]byte(tt.body)); got != tt.want {
			t.Errorf("detail(%.30q) = %q, want %q", tt.body, got, tt.want)
		}
	}
}

// The client's node as python3-jenkins, written against real controllers,
// reads it back; its secret, offline mark and deletion likewise.
func TestClientAgainstPythonJenkins(t *testing.T) {
	for _, crumbs := range []bool{true, false} {
		name := map[bool]string{true: "with crumbs", false: "CSRF off"}[crumbs]
		t.Run(name, func(t *testing.T) {
			srv := jenkinstest.New(jenkinstest.Options{User: testUser, Token: testToken, NoCrumbs: !crumbs})
			defer srv.Close()
			c := &Client{URL: srv.URL, User: testUser, Token: testToken}
			ctx := context.Background()
			if id, err := c.Whoami(ctx); err != nil || id != testUser {
				t.Fatalf("Whoami = %q, %v", id, err)
			}
			spec := NodeSpec{Name: "hangar-ci-abcd1234", Description: "Hangar pool ci: test", Label: "hangar-linux", RemoteFS: "/var/lib/agent", Executors: 1, Exclusive: true}
			if err := c.CreateNode(ctx, spec); err != nil {
				t.Fatal(err)
			}
			if err := c.CreateNode(ctx, spec); err == nil || !strings.Contains(err.Error(), "already exists") {
				t.Errorf("creating it again: %v, want Jenkins's refusal", err)
			}
			secret, err := c.Secret(ctx, spec.Name)
			if err != nil || secret != srv.Secret(spec.Name) {
				t.Errorf("Secret = %q, %v; want the node's", secret, err)
			}
			if err := c.MarkOffline(ctx, spec.Name, "Hangar: idle"); err != nil {
				t.Fatal(err)
			}
			got := srv.Python(t, `
import xml.etree.ElementTree as ET
info = server.get_node_info('hangar-ci-abcd1234')
cfg = ET.fromstring(server.get_node_config('hangar-ci-abcd1234'))
print(json.dumps({'description': info['description'], 'numExecutors': info['numExecutors'],
    'temporarilyOffline': info['temporarilyOffline'], 'offlineCauseReason': info['offlineCauseReason'],
    'labels': sorted(l['name'] for l in info['assignedLabels']),
    'launcher': cfg.find('launcher').get('class'), 'webSocket': cfg.findtext('launcher/webSocket'),
    'mode': cfg.findtext('mode'), 'remoteFS': cfg.findtext('remoteFS'),
    'retention': cfg.find('retentionStrategy').get('class')}))`)
			want := map[string]any{
				"description": "Hangar pool ci: test", "numExecutors": 1.0, "temporarilyOffline": true, "offlineCauseReason": "Hangar: idle",
				"labels": []any{"hangar-ci-abcd1234", "hangar-linux"}, "launcher": "hudson.slaves.JNLPLauncher", "webSocket": "true",
				"mode": "EXCLUSIVE", "remoteFS": "/var/lib/agent", "retention": "hudson.slaves.RetentionStrategy$Always",
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("python3-jenkins reads the node as\n%v\nwant\n%v", got, want)
			}
			comp, err := c.Computer(ctx, spec.Name)
			if err != nil || !comp.TemporarilyOffline || !comp.Offline || !comp.Idle || comp.NumExecutors != 1 || comp.Description != spec.Description {
				t.Errorf("Computer = %+v, %v", comp, err)
			}
			if err := c.ToggleOffline(ctx, spec.Name); err != nil {
				t.Fatal(err)
			}
			if comp, err := c.Computer(ctx, spec.Name); err != nil || comp.TemporarilyOffline {
				t.Errorf("after ToggleOffline: %+v, %v", comp, err)
			}
			if err := c.DeleteNode(ctx, spec.Name); err != nil {
				t.Fatal(err)
			}
			if _, err := c.Computer(ctx, spec.Name); !errors.Is(err, ErrNotFound) {
				t.Errorf("Computer of a deleted node: %v, want ErrNotFound", err)
			}
			if _, err := c.Secret(ctx, spec.Name); !errors.Is(err, ErrNotFound) {
				t.Errorf("Secret of a deleted node: %v, want ErrNotFound", err)
			}
			if got := srv.Python(t, `print(json.dumps({'exists': server.node_exists('hangar-ci-abcd1234')}))`); got["exists"] != false {
				t.Error("python3-jenkins still sees the deleted node")
			}
		})
	}
}

func TestClientQueueAndComputers(t *testing.T) {
	srv := jenkinstest.New(jenkinstest.Options{User: testUser, Token: testToken})
	defer srv.Close()
	srv.Enqueue("free", "hangar-linux", false)
	srv.Enqueue("pipe", "hangar-linux", true)
	c := &Client{URL: srv.URL, User: testUser, Token: testToken}
	items, err := c.Queue(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(items) != 2 || items[0].Task.Name != "free" || items[0].Task.LabelExpression != "hangar-linux" ||
		items[1].Task.LabelExpression != "" || !strings.Contains(items[1].Task.Class, "PlaceholderTask") {
		t.Fatalf("queue %+v", items)
	}
	for _, it := range items {
		if it.Label() != "hangar-linux" || !it.Buildable || it.Pending || it.Blocked {
			t.Errorf("item %+v: label %q", it, it.Label())
		}
	}
	comps, err := c.Computers(context.Background())
	if err != nil || len(comps) != 1 || comps[0].DisplayName != "Built-In Node" {
		t.Errorf("Computers = %+v, %v", comps, err)
	}
}

func TestClientErrors(t *testing.T) {
	srv := jenkinstest.New(jenkinstest.Options{User: testUser, Token: testToken})
	defer srv.Close()
	ctx := context.Background()
	bad := &Client{URL: srv.URL, User: testUser, Token: "not-the-token"}
	_, err := bad.Queue(ctx)
	if !errors.Is(err, ErrAuth) || !strings.Contains(err.Error(), `HTTP 401: user "hangar" or its API token was refused`) || strings.Contains(err.Error(), "not-the-token") {
		t.Errorf("wrong token: %v", err)
	}
	if err := bad.DeleteNode(ctx, "x"); !errors.Is(err, ErrAuth) || !strings.Contains(err.Error(), "getting a CSRF crumb") {
		t.Errorf("POST with a wrong token: %v", err)
	}
	down := &Client{URL: "http://127.0.0.1:1/", User: testUser, Token: testToken}
	if _, err := down.Queue(ctx); err == nil || !strings.Contains(err.Error(), "reading the build queue") || strings.Contains(err.Error(), testToken) {
		t.Errorf("unreachable controller: %v", err)
	}
}
