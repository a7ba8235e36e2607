// argocd-health runs health checks laid out as Argo CD's resource_customizations/<group>/<Kind>/
// (health.lua, health_test.yaml, testdata/) through Argo CD's own Lua engine, the way Argo CD runs
// them: as an argocd-cm resource customization (standard libraries off) and as a built-in script
// (standard libraries on, as Argo CD's TestLuaHealthScript does). One JSON line per case on stdout;
// exit status 1 if any case's result differs from its expected healthStatus.
//
//	argocd-health DIR
package main

import (
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/argoproj/argo-cd/gitops-engine/v3/pkg/health"
	appv1 "github.com/argoproj/argo-cd/v3/pkg/apis/application/v1alpha1"
	"github.com/argoproj/argo-cd/v3/util/lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"
)

// testFile is the shape of Argo CD's health_test.yaml.
type testFile struct {
	Tests []struct {
		InputPath    string               `json:"inputPath"`
		HealthStatus *health.HealthStatus `json:"healthStatus"`
	} `json:"tests"`
}

type outcome struct {
	Health *health.HealthStatus `json:"health"`
	Error  string               `json:"error,omitempty"`
}

type result struct {
	Resource  string               `json:"resource"` // the argocd-cm key: <group>/<Kind>
	InputPath string               `json:"inputPath"`
	Expected  *health.HealthStatus `json:"expected"`
	Override  outcome              `json:"override"` // resource.customizations.health.<group>_<Kind> in argocd-cm
	BuiltIn   outcome              `json:"builtIn"`  // resource_customizations/ compiled into Argo CD
	OK        bool                 `json:"ok"`
}

func loadObject(path string) (*unstructured.Unstructured, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	obj := map[string]any{}
	if err := yaml.Unmarshal(raw, &obj); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &unstructured.Unstructured{Object: obj}, nil
}

func asOutcome(h *health.HealthStatus, err error) outcome {
	if err != nil {
		return outcome{Error: err.Error()}
	}
	return outcome{Health: h}
}

func same(a, b *health.HealthStatus) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.Status == b.Status && a.Message == b.Message
}

func runDir(dir string, out *json.Encoder) (bool, error) {
	script, err := os.ReadFile(filepath.Join(dir, "health.lua"))
	if err != nil {
		return false, err
	}
	raw, err := os.ReadFile(filepath.Join(dir, "health_test.yaml"))
	if err != nil {
		return false, err
	}
	var tests testFile
	if err := yaml.UnmarshalStrict(raw, &tests); err != nil {
		return false, fmt.Errorf("%s/health_test.yaml: %w", dir, err)
	}
	allOK := true
	for _, test := range tests.Tests {
		obj, err := loadObject(filepath.Join(dir, test.InputPath))
		if err != nil {
			return false, err
		}
		// The script is found by the object's own group and kind, as Argo CD looks it up: a test
		// object of another kind finds no script and fails its case.
		key := lua.GetConfigMapKey(obj.GroupVersionKind())
		overrides := lua.ResourceHealthOverrides{key: appv1.ResourceOverride{HealthLua: string(script)}}
		r := result{Resource: key, InputPath: test.InputPath, Expected: test.HealthStatus,
			Override: asOutcome(overrides.GetResourceHealth(obj))}
		r.BuiltIn = asOutcome(lua.VM{UseOpenLibs: true}.ExecuteHealthLua(obj, string(script)))
		r.OK = r.Override.Error == "" && r.BuiltIn.Error == "" &&
			same(r.Override.Health, test.HealthStatus) && same(r.BuiltIn.Health, test.HealthStatus)
		allOK = allOK && r.OK
		if err := out.Encode(r); err != nil {
			return false, err
		}
	}
	return allOK, nil
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: argocd-health DIR (laid out as Argo CD's resource_customizations/)")
		os.Exit(2)
	}
	out := json.NewEncoder(os.Stdout)
	allOK, found := true, 0
	err := filepath.WalkDir(os.Args[1], func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.Name() != "health.lua" {
			return err
		}
		found++
		ok, err := runDir(filepath.Dir(path), out)
		allOK = allOK && ok
		return err
	})
	if err == nil && found == 0 {
		err = fmt.Errorf("no health.lua under %s", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "argocd-health:", err)
		os.Exit(2)
	}
	if !allOK {
		os.Exit(1)
	}
}
