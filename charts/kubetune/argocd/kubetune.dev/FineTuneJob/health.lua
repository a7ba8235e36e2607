-- Argo CD health of a kubetune.dev FineTuneJob: resource.customizations.health.kubetune.dev_FineTuneJob
-- in argocd-cm, or resource_customizations/kubetune.dev/FineTuneJob/health.lua in Argo CD.
-- Only the base and table libraries are used: argocd-cm scripts run without Lua's standard libraries.
local hs = {}
local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator"
  return hs
end
local generation = obj.metadata.generation
-- A spec change the operator refused (a field that cannot change once training started) is recorded
-- only as a condition: the run goes on with its old spec, so what Git declares is never reached.
if status.conditions ~= nil then
  for _, c in ipairs(status.conditions) do
    if c.type == "Validated" and c.status == "False" and c.observedGeneration == generation
        and status.phase ~= "Failed" then
      hs.status = "Degraded"
      hs.message = c.message
      return hs
    end
  end
end
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end
local phase = status.phase
local message = status.message or ""
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Succeeded"
  if status.adapterRef ~= nil then
    hs.message = "Succeeded: LoraAdapter " .. status.adapterRef.name
  end
  return hs
end
if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message ~= "" and message or "Failed"
  return hs
end
-- Suspended is what a person asked for (spec.suspend). A job Kueue has not admitted yet, or has
-- preempted, is Queued: Progressing, since it goes on by itself once the queue has room.
hs.status = phase == "Suspended" and "Suspended" or "Progressing"
local details = {}
local p = status.progress
if p ~= nil and p.totalSteps ~= nil then
  table.insert(details, "step " .. (p.step or 0) .. "/" .. p.totalSteps)
end
if message ~= "" then
  table.insert(details, message)
end
hs.message = phase
if #details > 0 then
  hs.message = phase .. ": " .. table.concat(details, "; ")
end
return hs
