-- Argo CD health of a kubetune.dev LoraAdapter: resource.customizations.health.kubetune.dev_LoraAdapter
-- in argocd-cm, or resource_customizations/kubetune.dev/LoraAdapter/health.lua in Argo CD.
-- Only the base and table libraries are used: argocd-cm scripts run without Lua's standard libraries.
local hs = {}
local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator"
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end
local phase = status.phase
local message = status.message or ""
if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message ~= "" and message or "Failed"
  return hs
end
if phase ~= "Ready" then
  hs.status = "Progressing"
  hs.message = phase
  if message ~= "" then
    hs.message = phase .. ": " .. message
  end
  return hs
end
-- Ready, but the stage the spec asks for may be held back by the evaluation gate: the adapter
-- serves as a candidate, yet what Git declares (production) is not reached until it passes.
if status.conditions ~= nil then
  for _, c in ipairs(status.conditions) do
    if c.type == "Promoted" and c.status == "False" then
      -- Waiting for the verification Job to hash the content: production comes once it reports.
      if c.reason == "ContentNotVerified" then
        hs.status = "Progressing"
      else
        hs.status = "Degraded"
      end
      hs.message = c.message
      return hs
    end
  end
end
hs.status = "Healthy"
hs.message = "Ready (stage " .. (status.stage or "candidate") .. ")"
return hs
